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

from qtrain import PerTensor, PerToken, QuantSpec, formats
from qtrain.api import quantize_
from qtrain.kernels import reference
from qtrain.lowp import (
    Float8TrainingConfig,
    Int8Gemm,
    Int8TrainingConfig,
    LowPrecisionLinear,
    _hash_keys,
    _quantize_twin,
    low_precision_linear,
)
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


def test_set_bits_changes_results_without_recompiling():
    model = quantize_(
        nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)),
        Int8TrainingConfig(stochastic_grad=True),
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: model(x).square().mean(), backend=counter, fullgraph=True)
    x = torch.randn(24, 32)
    compiled(x).backward()
    eight_bit = model(x)
    for layer in model.modules():
        if isinstance(layer, LowPrecisionLinear):
            layer.set_bits(3, 5)
    torch.manual_seed(5)
    loss = compiled(x)
    loss.backward()
    torch.manual_seed(5)
    assert torch.equal(loss, model(x).square().mean())
    assert not torch.equal(model(x), eight_bit)
    assert counter.frame_count == 1
    with pytest.raises(QuantSpecError):
        LowPrecisionLinear(4, 4, config=Float8TrainingConfig()).set_bits(4)


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
