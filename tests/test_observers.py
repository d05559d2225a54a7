"""Observers: the GEMM op asks each role's observer for its qparams (x and W in forward, the
layer gradient's two copies in backward); their state lives in state_dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qtrain import (
    NonFiniteError,
    PerChannel,
    QConv2d,
    QLinear,
    QuantSpec,
    QuantSpecError,
    formats,
    quantize,
)
from qtrain.api import QuantizedTrainingConfig, quantize_
from qtrain.clipping import cosine_distance, cosine_optimal_clip, magnitude_aware_clip
from qtrain.observers import (
    CosineClip,
    GradientClip,
    LSQStep,
    MagnitudeAwareClip,
    Observer,
    RunningMinMax,
)
from qtrain.ops import GemmConfig, quantized_linear
from qtrain.quantizer import AbsMax, Clip, LearnedStep, QParams, Rounding

INT8 = QuantSpec(formats.INT8)
UINT8 = QuantSpec(formats.UINT8)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class FixedScale(Observer):
    """A symmetric int scale fixed at construction; counts the calls (a buffer)."""

    def __init__(self, clip: float) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def qparams(self, x: torch.Tensor, spec: QuantSpec) -> QParams:
        self.calls += 1
        scale = torch.tensor([self.clip / spec.int_format.qmax])
        return QParams(scale, torch.zeros(1))


def _clip_spec(clip: float, rounding: Rounding = Rounding.NEAREST) -> QuantSpec:
    return QuantSpec(formats.INT8, scale=Clip(clip), rounding=rounding)


def test_weight_and_input_observers_give_the_forward_qparams() -> None:
    x, w = _randn(6, 8, seed=1), _randn(4, 8, seed=2)
    config = GemmConfig(input_spec=INT8, weight_spec=INT8)
    observers = {"input": FixedScale(0.5), "weight": FixedScale(0.25)}
    y = quantized_linear(x, w, None, config, observers=observers)
    # The same as a spec whose fixed clip is the observer's: values past it saturate.
    expected = F.linear(quantize(x, _clip_spec(0.5)), quantize(w, _clip_spec(0.25)))
    assert torch.equal(y, expected)
    assert int(observers["input"].calls) == int(observers["weight"].calls) == 1


def test_gradient_observers_are_asked_in_backward_for_each_copy() -> None:
    x = _randn(6, 8, seed=3).requires_grad_()
    w = _randn(4, 8, seed=4).requires_grad_()
    grad = _randn(6, 4, seed=5)
    config = GemmConfig(grad_input_spec=INT8, grad_weight_spec=QuantSpec(formats.Int(12)))
    observers = {"grad_input": FixedScale(0.3), "grad_weight": FixedScale(2.0)}
    quantized_linear(x, w, None, config, observers=observers).backward(grad)
    g_in = quantize(grad, _clip_spec(0.3))
    g_w = quantize(grad, QuantSpec(formats.Int(12), scale=Clip(2.0)))
    assert torch.equal(x.grad, g_in @ w.detach())
    assert torch.equal(w.grad, g_w.t() @ x.detach())
    assert int(observers["grad_input"].calls) == int(observers["grad_weight"].calls) == 1
    # A clipped copy differs from the spec's own absmax rule: the observer really decided.
    assert not torch.equal(x.grad, quantize(grad, INT8) @ w.detach())


def test_no_observer_for_a_role_keeps_the_specs_own_rule() -> None:
    x, w = _randn(5, 8, seed=6), _randn(3, 8, seed=7)
    config = GemmConfig(input_spec=INT8, weight_spec=INT8)
    y = quantized_linear(x, w, None, config, observers={"grad_input": FixedScale(1.0)})
    assert torch.equal(y, F.linear(quantize(x, INT8), quantize(w, INT8)))


def test_running_min_max_defers_to_a_rule_it_does_not_keep() -> None:
    observer = RunningMinMax()
    assert observer.qparams(_randn(4, 4, seed=8), QuantSpec(formats.INT8, scale=AbsMax())) is None
    assert observer.low.numel() == 0


def test_running_min_max_momentum_is_validated() -> None:
    with pytest.raises(QuantSpecError, match="RunningMinMax.momentum"):
        RunningMinMax(momentum=2.0)


def test_quantize_builds_one_observer_set_per_layer_from_the_config() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = QuantizedTrainingConfig(
        GemmConfig(INT8, INT8, INT8, INT8), observers={"weight": lambda: FixedScale(1.0)}
    )
    quantize_(model, config)
    first, second = model[0].observers, model[2].observers
    assert set(first) == {"input", "weight"} and isinstance(first["input"], RunningMinMax)
    assert first["weight"] is not second["weight"]  # not shared between layers
    model(_randn(3, 8, seed=9))
    assert int(first["weight"].calls) == int(second["weight"].calls) == 1


def test_unknown_observer_role_is_refused() -> None:
    with pytest.raises(QuantSpecError, match="observers"):
        QuantizedTrainingConfig(GemmConfig(), observers={"bias": RunningMinMax})
    with pytest.raises(QuantSpecError, match="observers"):
        QLinear(4, 2, observers={"output": RunningMinMax()})


def test_observer_state_is_in_the_state_dict_and_loads_back() -> None:
    layer = QLinear(8, 3, config=GemmConfig(weight_spec=INT8), observers={"weight": FixedScale(1)})
    for seed in range(3):
        layer(_randn(2, 8, seed=seed))
    state = layer.state_dict()
    assert int(state["observers.weight.calls"]) == 3
    other = QLinear(8, 3, config=GemmConfig(weight_spec=INT8), observers={"weight": FixedScale(1)})
    other.load_state_dict(state, strict=True)
    assert int(other.observers["weight"].calls) == 3


def test_running_ranges_saved_before_observers_load_into_the_input_observer() -> None:
    layer = QConv2d(2, 3, 3, config=GemmConfig(input_spec=UINT8))
    layer(_randn(2, 2, 5, 5, seed=10))
    state = layer.state_dict()
    old = {
        key.replace("observers.input.", "input_"): value for key, value in state.items()
    }  # the keys a qtrain from before observers wrote
    assert {"input_low", "input_high"} <= set(old)
    other = QConv2d(2, 3, 3, config=GemmConfig(input_spec=UINT8))
    other.load_state_dict(old, strict=True)
    assert torch.equal(other.observers["input"].low, layer.observers["input"].low)
    assert torch.equal(other.observers["input"].high, layer.observers["input"].high)


def test_sync_without_a_process_group_changes_nothing() -> None:
    observer = RunningMinMax()
    observer.qparams(_randn(4, 4, seed=11), UINT8)
    low = observer.low.clone()
    observer.sync()
    assert torch.equal(observer.low, low)


# ---- gradient clip observers (Unified INT8, Distribution-adaptive INT8) ----------------------


def test_a_lone_grad_input_observer_quantizes_the_one_copy_both_products_use() -> None:
    x = _randn(6, 8, seed=8).requires_grad_()
    w = _randn(4, 8, seed=9).requires_grad_()
    grad = _randn(6, 4, seed=10)
    config = GemmConfig(grad_input_spec=INT8, grad_weight_spec=INT8)
    observers = {"grad_input": FixedScale(0.3)}
    quantized_linear(x, w, None, config, observers=observers).backward(grad)
    g_hat = quantize(grad, _clip_spec(0.3))
    assert torch.equal(x.grad, g_hat @ w.detach())
    assert torch.equal(w.grad, g_hat.t() @ x.detach())
    assert int(observers["grad_input"].calls) == 1
    # The first layer of a network (no input gradient) still gets its clipped copy.
    w.grad = None
    quantized_linear(x.detach(), w, None, config, observers=observers).backward(grad)
    assert torch.equal(w.grad, g_hat.t() @ x.detach()) and int(observers["grad_input"].calls) == 2


def heavy_gradient(seed: int = 11) -> torch.Tensor:
    g = _randn(64, 32, seed=seed, scale=1e-3)
    g[0, :4] = torch.tensor([0.2, -0.1, 0.15, -0.05])  # a few outliers
    return g


def test_cosine_clip_searches_every_interval_and_keeps_its_clip_between() -> None:
    observer = CosineClip(interval=3)
    spec = QuantSpec(formats.INT8, rounding=Rounding.STOCHASTIC)
    g = heavy_gradient()
    qparams = observer.qparams(g, spec)
    clip = cosine_optimal_clip(g, rounding="stochastic")
    distance = cosine_distance(g, clip, rounding="stochastic")
    assert float(observer.clip) == pytest.approx(clip)
    assert float(observer.distance) == pytest.approx(distance, rel=1e-4)
    assert float(qparams.scale) == pytest.approx(clip / 127)
    # Calls 1 and 2 reuse the clip, whatever g does; call 3 searches again.
    for _ in range(2):
        assert float(observer.qparams(10 * g, spec).scale) == pytest.approx(clip / 127)
    assert float(observer.qparams(10 * g, spec).scale) == pytest.approx(10 * clip / 127, rel=1e-3)
    assert int(observer.calls) == 4
    # The chosen clip turns g less than plain absmax does.
    plain = GradientClip(interval=3)
    plain.qparams(g, spec)
    assert float(plain.distance) > distance


def test_gradient_clip_refuses_an_unsigned_spec_and_nan_gradients() -> None:
    with pytest.raises(QuantSpecError, match="signed integer spec"):
        CosineClip().qparams(heavy_gradient(), UINT8)
    with pytest.raises(NonFiniteError):
        GradientClip().qparams(torch.tensor([1.0, math.inf]), INT8)
    with pytest.raises(QuantSpecError, match="interval must be a positive int"):
        CosineClip(interval=0)
    with pytest.raises(QuantSpecError, match="threshold must be a number in"):
        MagnitudeAwareClip(threshold=1.5)
    with pytest.raises(QuantSpecError, match=r"k·A in \[0, 1\]"):
        MagnitudeAwareClip(k=2.0)


def conv_gradient(scales: list[float], seed: int = 12) -> torch.Tensor:
    """A (N, C, H, W) layer gradient: channel 0 Gaussian, channel 1 Laplace, scaled."""
    torch.manual_seed(seed)
    gaussian = torch.randn(32, 1, 8, 8)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((32, 1, 8, 8))
    return torch.cat([gaussian, laplace], 1) * torch.tensor(scales).view(1, 2, 1, 1)


def test_magnitude_aware_clip_per_output_channel_over_calls() -> None:
    observer = MagnitudeAwareClip(interval=2)
    spec = QuantSpec(formats.INT8, granularity=PerChannel(1))
    steps = [
        conv_gradient([1.0, 1.0], seed=s) * m
        for s, m in zip((1, 2, 3), (1.0, 3.0, 0.5), strict=True)
    ]
    state = None
    for g in steps:
        amax = g.abs().amax(dim=(0, 2, 3))
        state = amax if state is None else magnitude_aware_clip(state, amax)
        scale = observer.qparams(g, spec).scale
        assert observer.inverted.tolist() == [0.0, 1.0]  # Gaussian, inverted-T
        # Gaussian: max|g|; inverted-T: the recurrence s_t = 0.2·s_{t−1} + 0.8·max|g|_t.
        assert scale.tolist() == pytest.approx([float(amax[0]) / 127, float(state[1]) / 127])
    assert observer.state.tolist() == pytest.approx(state.tolist())
    assert observer.inverted_rate.tolist() == [0.0, 1.0]  # over calls 0-1, read at call 2
    everything_gaussian = MagnitudeAwareClip(all_gaussian=True)
    for g in steps:
        scale = everything_gaussian.qparams(g, spec).scale
    assert scale.tolist() == pytest.approx((steps[-1].abs().amax(dim=(0, 2, 3)) / 127).tolist())


def test_gradient_observer_state_survives_a_state_dict_round_trip() -> None:
    observer = MagnitudeAwareClip()
    spec = QuantSpec(formats.INT8, granularity=PerChannel(1))
    observer.qparams(conv_gradient([1.0, 2.0]), spec)
    fresh = MagnitudeAwareClip()
    fresh.load_state_dict(observer.state_dict())
    for name, buffer in observer.named_buffers():
        assert torch.equal(getattr(fresh, name), buffer), name
    clip = CosineClip()
    clip.qparams(heavy_gradient(), INT8)
    loaded = CosineClip()
    loaded.load_state_dict(clip.state_dict())
    assert torch.equal(loaded.clip, clip.clip) and int(loaded.calls) == 1


# ---- LSQStep ---------------------------------------------------------------------------------


def test_lsq_step_refuses_bad_arguments_and_specs() -> None:
    with pytest.raises(QuantSpecError, match="LSQStep.signed"):
        LSQStep(signed="yes")
    with pytest.raises(QuantSpecError, match="LSQStep.channels"):
        LSQStep(0)
    with pytest.raises(QuantSpecError, match="LearnedStep"):
        LSQStep().fake_quantize(torch.ones(3), QuantSpec(formats.INT8))
    spec = QuantSpec(formats.Int(4), granularity=PerChannel(0), scale=LearnedStep())
    with pytest.raises(QuantSpecError, match="3 steps"):
        LSQStep(3).fake_quantize(torch.ones(5, 2), spec)


def test_lsq_step_reports_no_qparams_before_it_has_seen_a_tensor_then_its_step() -> None:
    observer = LSQStep()
    spec = QuantSpec(formats.Int(4), scale=LearnedStep())
    assert observer.qparams(torch.ones(3), spec) is None
    observer.fake_quantize(torch.tensor([-1.0, 1.0]), spec)
    qparams = observer.qparams(torch.ones(3), spec)
    assert torch.equal(qparams.scale, observer.step.detach()) and float(qparams.zero_point) == 0


def test_lsq_step_pushed_below_zero_keeps_its_size_and_a_gradient() -> None:
    observer = LSQStep()
    spec = QuantSpec(formats.Int(4), scale=LearnedStep())
    x = torch.tensor([-1.0, 0.3, 2.0])
    before = observer.fake_quantize(x, spec).detach()
    with torch.no_grad():
        observer.step.neg_()
    after = observer.fake_quantize(x, spec)
    assert torch.equal(before, after.detach())
    after.sum().backward()
    assert observer.step.grad is not None and torch.isfinite(observer.step.grad).all()
