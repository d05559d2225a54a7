"""Low-precision GEMM training (qtrain.lowp): the real int8/fp8 products against their emulated
twins, numerics against fp32, short training runs, quantize_ round trips, torch.compile.

What "agree" means, per product and device:
- CPU int8 (``torch._int_mm``): real == emulated bit for bit (exact integer accumulation).
- CPU fp8 (``torch._scaled_mm``, oneDNN): the same float32 sums as the twin, but oneDNN picks
  its kernel (and so the accumulation order) per CPU: bit for bit on one AVX-512 machine, 1-ulp
  differences with tensorwise scales on another (avx512_fp16). So: equal, or SNR ≥ 120 dB (one
  float32 rounding is ~144 dB; a reordered K-term sum stays within a few roundings).
- CUDA int8 (``_int_mm`` or the Triton matmul): bit for bit (exact integer accumulation, the
  same epilogue in the same order).
- CUDA fp8: SNR(real vs emulated) ≥ 40 dB — cuBLASLt accumulates in its own order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from qtrain import PerTensor, PerToken, Precision, QuantSpec, formats
from qtrain.api import dequantize_, quantize_
from qtrain.guard import NumericalGuard
from qtrain.kernels import reference
from qtrain.lowp import (
    Float8TrainingConfig,
    Int8Gemm,
    Int8TrainingConfig,
    LowPrecisionLinear,
    low_precision_linear,
    real_gemm_runs,
)
from qtrain.lowp_products import _epilogue, _hash_keys, _quantize_twin
from qtrain.protocol import QuantizedModule, QuantizedWeight, set_precision
from qtrain.quantizer import QuantSpecError, quantize_int

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU: torch._int_mm/_scaled_mm on cuBLASLt, Triton compiled"
)
needs_fp8_gpu = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+)",
)
ROOT = Path(__file__).resolve().parents[2]

CONFIGS = [
    Int8TrainingConfig(),
    Int8TrainingConfig(granularity=PerTensor(), stochastic_grad=True),
    Int8TrainingConfig(bits=4, grad_bits=6, stochastic_grad=True),
    Float8TrainingConfig(),
    Float8TrainingConfig(granularity=PerToken()),
]


def _snr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB: 20·log10(‖x‖ / ‖x − x̂‖)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float(20 * torch.log10(expected.norm() / (actual - expected).norm()))


def _step(config, x, weight, bias, seed: int = 1):
    """Output and the three gradients of one forward/backward with a fixed upstream gradient
    (config None: plain F.linear)."""
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    torch.manual_seed(seed)
    if config is None:
        y = nn.functional.linear(x, weight, bias)
    else:
        y = low_precision_linear(x, weight, bias, config)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    return (y, *torch.autograd.grad(y, (x, weight, bias), grad))


def _operands(device: str = "cpu", dtype: torch.dtype = torch.float32):
    # Odd sizes (nothing a multiple of 16, 3-D input): the real GEMMs pad, the twins do not.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 13, 45, generator=g)
    weight = torch.randn(29, 45, generator=g) / 7
    bias = torch.randn(29, generator=g)
    return x.to(device, dtype), weight.to(device), bias.to(device)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_real_products_equal_emulated_twin_on_cpu(config):
    real = _step(config, *_operands())
    emulated = _step(dataclasses.replace(config, emulate=True), *_operands())
    for got, want in zip(real, emulated, strict=True):
        if isinstance(config, Int8TrainingConfig):
            assert torch.equal(got, want)
        else:
            assert torch.equal(got, want) or _snr(got, want) >= 120.0


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_products_track_fp32_by_snr(config):
    want = _step(None, *_operands())
    got = _step(config, *_operands())
    if isinstance(config, Int8TrainingConfig):
        floor = 35.0 if config.bits == 8 else 12.0  # ~6 dB per bit
        floors = (
            floor,
            min(floor, 6.0 * config.grad_bits - 8),
            min(floor, 6.0 * config.grad_bits - 8),
        )
    else:
        floors = (25.0, 20.0, 20.0)  # e4m3 forward, e5m2 gradients
    for got_t, want_t, floor in zip(got[:3], want[:3], floors, strict=True):
        assert _snr(got_t, want_t) >= floor
    assert torch.allclose(got[3], want[3])  # the bias gradient is a plain sum


def test_int8_quantization_agrees_with_the_core_quantizer():
    """Nearest: quantize_int(PerToken) levels and scales. Stochastic: the reference's counter
    hash with the same seed — lowp's in-graph tensor seeds give the same draws."""
    a = torch.randn(20, 37)
    bound = torch.tensor(127.0)
    levels, scale = _quantize_twin(a, torch.int8, bound, None, rowwise=True)
    want_levels, want_scale, _ = quantize_int(a, QuantSpec(formats.INT8, granularity=PerToken()))
    assert torch.equal(levels, want_levels)
    assert torch.equal(scale, want_scale.view(-1))
    seed = 2**40 + 7
    levels, scale = _quantize_twin(a, torch.int8, bound, _hash_keys(torch.tensor(seed)), True)
    zero = torch.zeros(20)
    want = reference.quant_int(a.view(1, 20, 37), scale, zero, -127, 127, seed).view(20, 37)
    assert torch.equal(levels, want.to(torch.int8))


def test_stochastic_rounding_is_unbiased():
    a = torch.full((1, 4000), 0.3)
    a[0, 0] = 1.0  # absmax 1 → scale 1/7 at 4 bits: 0.3 = 2.1 levels
    bound = torch.tensor(7.0)
    draws = torch.stack(
        [
            _quantize_twin(a, torch.int8, bound, _hash_keys(torch.tensor(s)), True)[0][
                0, 1:
            ].float()
            for s in range(8)
        ]
    )
    assert set(draws.unique().tolist()) == {2.0, 3.0}
    assert abs(draws.mean().item() - 2.1) < 0.02


def test_non_finite_inputs_give_non_finite_outputs():
    x, weight, bias = _operands()
    x[0, 0, 0] = float("nan")
    for config in (Int8TrainingConfig(), Float8TrainingConfig(granularity=PerToken())):
        y = low_precision_linear(x, weight, bias, config)
        assert torch.isnan(y[0, 0]).all() and torch.isfinite(y[1:]).all()


def _train(config, steps: int = 150, device: str = "cpu") -> torch.Tensor:
    """Losses of a tiny MLP learning a fixed random teacher (cross-entropy, Adam)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1024, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 10, generator=g)).argmax(1)
    x, y = x.to(device), y.to(device)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).to(device)
    if config is not None:
        quantize_(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = (torch.arange(64, device=device) + 64 * step) % 1024
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_tiny_mlp_training_tracks_fp32():
    """The 10-step moving average of the loss stays within 0.03 (int8) / 0.06 (fp8) of
    fp32's over the run (measured: 0.003 and 0.016), and training does learn."""
    baseline = _train(None)

    def smooth(losses: torch.Tensor) -> torch.Tensor:
        return losses.unfold(0, 10, 1).mean(1)

    for config, tolerance in (
        (Int8TrainingConfig(stochastic_grad=True), 0.03),
        (Float8TrainingConfig(), 0.06),
    ):
        losses = _train(config)
        assert (smooth(losses) - smooth(baseline)).abs().max() <= tolerance
        assert losses[-10:].mean() < 0.3 * losses[:10].mean()


def test_quantize_swaps_linears_and_keeps_state_dict():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = quantize_(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        Int8TrainingConfig(),
        filter_fn=lambda module, name: name != "2",
    )
    assert type(model[0]) is LowPrecisionLinear and type(model[2]) is nn.Linear
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(20, 16)
    assert _snr(model(x), plain(x)) > 30
    plain.load_state_dict(model.state_dict())
    # A second pass leaves already-swapped layers alone; fp8 swaps the rest.
    quantize_(model, Float8TrainingConfig())
    assert isinstance(model[0].config, Int8TrainingConfig)
    assert isinstance(model[2].config, Float8TrainingConfig)


def test_configs_validate_and_round_trip_through_json():
    for config in CONFIGS + [Int8TrainingConfig(gemm=Int8Gemm.INT_MM, forward=False)]:
        assert type(config).from_dict(config.to_dict()) == config
    for bad in (dict(bits=9), dict(grad_bits=1), dict(granularity=formats.INT8), dict(gemm="x")):
        with pytest.raises(QuantSpecError):
            Int8TrainingConfig(**bad)
    with pytest.raises(QuantSpecError):
        Float8TrainingConfig(emulate="yes")


def test_disabled_products_run_in_full_precision():
    config = Int8TrainingConfig(forward=False, grad_input=False, grad_weight=False)
    got = _step(config, *_operands())
    want = _step(None, *_operands())
    for got_t, want_t in zip(got, want, strict=True):
        assert torch.allclose(got_t, want_t, atol=1e-5)


def test_set_precision_changes_results_without_recompiling():
    model = quantize_(
        nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)),
        Int8TrainingConfig(stochastic_grad=True),
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: model(x).square().mean(), backend=counter, fullgraph=True)
    x = torch.randn(24, 32)
    compiled(x).backward()
    eight_bit = model(x)
    set_precision(model, Precision(forward=3, backward=5, weight=4, grad_weight=6))
    torch.manual_seed(5)
    loss = compiled(x)
    loss.backward()
    torch.manual_seed(5)
    assert torch.equal(loss, model(x).square().mean())
    assert not torch.equal(model(x), eight_bit)
    set_precision(model, None)  # back to the configured 8 bits
    assert torch.equal(compiled(x), eight_bit.square().mean())
    assert counter.frame_count == 1


# ---- the quantized-module protocol ----------------------------------------------------------


def _layer(config, in_features: int = 10, out_features: int = 6) -> LowPrecisionLinear:
    torch.manual_seed(0)
    return LowPrecisionLinear(in_features, out_features, config=config)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_layers_follow_the_quantized_module_protocol(config):
    layer = _layer(config)
    assert isinstance(layer, QuantizedModule)
    assert layer.sample_role_bits() is None
    plain = layer.to_float()
    assert type(plain) is nn.Linear and plain.training == layer.training
    assert plain.weight is layer.weight and plain.bias is layer.bias
    model = dequantize_(nn.Sequential(layer))
    assert type(model[0]) is nn.Linear


def test_role_bits_are_the_bits_of_each_low_precision_product():
    eight = {"forward": (8, 8), "grad_input": (8, 8), "grad_weight": (8, 8)}
    assert _layer(Int8TrainingConfig()).role_bits() == eight
    assert _layer(Float8TrainingConfig()).role_bits(16.0) == eight
    # The gradient copy is the left operand of both backward products; x and W share bits.
    mixed = _layer(Int8TrainingConfig(bits=4, grad_bits=6)).role_bits()
    assert mixed == {"forward": (4, 4), "grad_input": (6, 4), "grad_weight": (6, 4)}
    # A product the config leaves in floating point counts the float width (16 under autocast).
    partial = _layer(Int8TrainingConfig(forward=False, grad_weight=False)).role_bits(16.0)
    assert partial == {"forward": (16.0, 16.0), "grad_input": (8, 8), "grad_weight": (16.0, 16.0)}


def test_weight_storage_bits_are_the_deployed_values_and_scales():
    weights = 6 * 10
    assert _layer(Int8TrainingConfig()).weight_storage_bits() == weights * 8 + 6 * 32  # per row
    per_tensor = Int8TrainingConfig(bits=4, granularity=PerTensor())
    assert _layer(per_tensor).weight_storage_bits() == weights * 4 + 32
    assert _layer(Float8TrainingConfig()).weight_storage_bits() == weights * 8 + 32
    fp8_rows = Float8TrainingConfig(granularity=PerToken())
    assert _layer(fp8_rows).weight_storage_bits() == weights * 8 + 6 * 32
    assert _layer(Int8TrainingConfig(forward=False)).weight_storage_bits() == weights * 32
    layer = _layer(Int8TrainingConfig())
    layer.set_precision(Precision(forward=8, weight=5))
    assert layer.weight_storage_bits() == weights * 5 + 6 * 32


@pytest.mark.parametrize("granularity", [PerToken(), PerTensor()], ids=str)
def test_quantized_weight_is_what_the_forward_product_uses(granularity):
    config = Int8TrainingConfig(bits=6, granularity=granularity, emulate=True)
    layer = _layer(config, in_features=45, out_features=29)
    qweight = layer.quantized_weight()
    assert isinstance(qweight, QuantizedWeight)
    assert (qweight.bits, qweight.signed, qweight.levels.dtype) == (6, True, torch.int8)
    assert qweight.levels.abs().max() <= 31 and not qweight.zero_point.any()
    assert qweight.scale.shape == ((29, 1) if isinstance(granularity, PerToken) else ())
    assert _snr(qweight.dequantize(), layer.weight) > 25
    # The layer's output is the int8 product of x's levels with exactly these weight levels.
    x = torch.randn(13, 45)
    x_levels, x_scale = _quantize_twin(
        x, torch.int8, torch.tensor(31.0), None, config.granularity == PerToken()
    )
    acc = x_levels.float() @ qweight.levels.float().t()
    want = _epilogue(acc, x_scale, qweight.scale.reshape(-1), layer.bias, torch.float32)
    assert torch.equal(layer(x), want)


def test_fp8_has_no_integer_weight():
    assert _layer(Float8TrainingConfig()).quantized_weight() is None
    assert _layer(Int8TrainingConfig(forward=False)).quantized_weight() is None


def test_set_precision_sets_int8_bits_and_refuses_what_int8_or_fp8_cannot_take():
    layer = _layer(Int8TrainingConfig(bits=6, grad_bits=7))
    layer.set_precision(Precision(forward=4, backward=5))
    assert layer.role_bits() == {"forward": (4, 4), "grad_input": (5, 4), "grad_weight": (5, 4)}
    layer.set_precision(Precision(forward=4, weight=3, grad_weight=2))  # backward: configured
    assert layer.role_bits() == {"forward": (4, 3), "grad_input": (7, 3), "grad_weight": (2, 4)}
    layer.set_precision(None)
    assert layer.role_bits() == {"forward": (6, 6), "grad_input": (7, 6), "grad_weight": (7, 6)}
    with pytest.raises(QuantSpecError, match=r"Precision.forward must be an int in 2..8"):
        layer.set_precision(Precision(forward=12))
    with pytest.raises(QuantSpecError, match="precision must be"):
        layer.set_precision(4)
    fp8 = _layer(Float8TrainingConfig())
    fp8.set_precision(None)
    fp8.set_precision(Precision())  # sets no bits
    with pytest.raises(QuantSpecError, match="fixed formats"):
        fp8.set_precision(Precision(forward=8))


def test_raise_floor_goes_to_8_bits_and_stays_under_any_schedule():
    x = torch.randn(12, 10)
    layer = _layer(Int8TrainingConfig(bits=4, grad_bits=8))
    eight_bit = _layer(Int8TrainingConfig())
    assert not torch.equal(layer(x), eight_bit(x))
    assert layer.raise_floor()
    assert layer.floor() == dict.fromkeys(
        ("input_spec", "weight_spec", "grad_input_spec", "grad_weight_spec"), 8.0
    )
    assert layer.role_bits() == eight_bit.role_bits()
    assert torch.equal(layer(x), eight_bit(x))  # the bounds buffer followed
    layer.set_precision(Precision(forward=2, backward=3))
    assert layer.role_bits() == eight_bit.role_bits()
    assert not layer.raise_floor()  # int8 holds no more than 8 bits
    resumed = _layer(Int8TrainingConfig(bits=4, grad_bits=8))
    resumed.set_floor(layer.floor())
    assert resumed.role_bits() == eight_bit.role_bits()
    with pytest.raises(QuantSpecError, match="at most 8 bits"):
        resumed.set_floor({"input_spec": 16.0})
    assert not _layer(Int8TrainingConfig()).raise_floor()
    assert not _layer(Float8TrainingConfig()).raise_floor()
    # The numerical guard raises a low-precision layer through the protocol.
    model = nn.Sequential(_layer(Int8TrainingConfig(bits=4)))
    assert NumericalGuard(model).raise_precision("0")
    assert model[0].role_bits()["forward"] == (8, 8)


def test_bits_in_force_survive_a_step_rolled_back_by_the_trainer():
    # The trainer restores every buffer of an abandoned step, the bounds included; the next
    # set_precision writes them again even when the bits it sets are those already in force.
    layer = _layer(Int8TrainingConfig(bits=4))
    before = layer.bounds.clone()
    layer.set_precision(Precision(forward=6))
    in_force = layer.bounds.clone()
    layer.bounds.copy_(before)  # the rollback
    layer.set_precision(Precision(forward=6))
    assert torch.equal(layer.bounds, in_force)
    assert in_force.tolist() == [31.0, 31.0, 127.0, 127.0]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_linear_backward_quantizes_its_gradient_once_for_both_products(
    autocast, monkeypatch, fused
):
    """Row-wise int8 without stochastic rounding on the CPU: g's levels for grad-input (per
    row) and grad-weight (per column) come from one quantize_rows_int8_both call, with the
    bits of the twin; with stochastic rounding, or one gradient wanted, each product quantizes
    its own copy."""
    calls: list[tuple[int, ...]] = []
    original = fused.quantize_rows_int8_both

    def spy(g, *args):
        calls.append(tuple(g.shape))
        return original(g, *args)

    monkeypatch.setattr(fused, "quantize_rows_int8_both", spy)
    config = Int8TrainingConfig()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        real = _step(config, *_operands())
        twin = _step(dataclasses.replace(config, emulate=True), *_operands())
    assert calls == [(39, 29)]  # x (3, 13, 45) as 39 rows, 29 outputs
    for got, want in zip(real, twin, strict=True):
        assert torch.equal(got, want)
    calls.clear()
    _step(dataclasses.replace(config, stochastic_grad=True), *_operands())
    x, weight, _ = _operands()
    low_precision_linear(x, weight.requires_grad_(), None, config).sum().backward()
    assert calls == []


def test_real_gemms_run_on_this_torch_build_cpu():
    # torch 2.13 CPU: _int_mm on int8 tensors and _scaled_mm on fp8 ones (oneDNN) both run.
    for config in CONFIGS:
        assert real_gemm_runs(config, "cpu")


def test_autocast_computes_in_bfloat16():
    x, weight, bias = _operands()
    for config in (Int8TrainingConfig(), Float8TrainingConfig()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, grad_x, grad_w, grad_b = _step(config, x, weight, bias)
        assert y.dtype == torch.bfloat16
        assert grad_x.dtype == grad_w.dtype == grad_b.dtype == torch.float32


def test_benchmark_script_smoke_runs(tmp_path):
    out = tmp_path / "gpu.json"
    # The interpreter runs the kernel section on the CPU; one thread: toy sizes gain nothing
    # from more, and lose much when the cores are busy.
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"environment", "kernels", "train_step", "loss_curves"} <= report.keys()


# ---- on a CUDA GPU ------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("gemm", [Int8Gemm.INT_MM, Int8Gemm.TRITON])
def test_cuda_int8_equals_emulated_twin(gemm):
    operands = _operands("cuda", torch.bfloat16)
    config = Int8TrainingConfig(gemm=gemm, stochastic_grad=True)
    real = _step(config, *operands)
    emulated = _step(dataclasses.replace(config, emulate=True), *operands)
    for got, want in zip(real, emulated, strict=True):
        assert torch.equal(got, want)


@needs_fp8_gpu
@pytest.mark.parametrize("granularity", [PerTensor(), PerToken()], ids=str)
def test_cuda_fp8_tracks_emulated_twin(granularity):
    operands = _operands("cuda", torch.bfloat16)
    config = Float8TrainingConfig(granularity=granularity)
    real = _step(config, *operands)
    emulated = _step(dataclasses.replace(config, emulate=True), *operands)
    for got, want in zip(real, emulated, strict=True):
        assert _snr(got, want) >= 40


@needs_cuda
def test_cuda_training_tracks_fp32():
    baseline = _train(None, device="cuda")
    for config, tolerance in ((Int8TrainingConfig(), 0.03), (Float8TrainingConfig(), 0.06)):
        if isinstance(config, Float8TrainingConfig) and torch.cuda.get_device_capability() < (8, 9):
            continue
        losses = _train(config, device="cuda")
        assert (losses - baseline).unfold(0, 10, 1).mean(1).abs().max() <= tolerance
