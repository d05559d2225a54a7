"""Distribution-adaptive INT8 (Zhao et al. 2021): the layers it sets up (per-channel
grad-weight copy), the per-channel clips applied in backward, the all-Gaussian ablation,
BitOPs, metrics, and the recurrence state across a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from symmetric_int8 import (
    SYNTHETIC,
    assert_eight_by_eight_bitops,
    assert_gemms_eight_by_eight,
    killed_and_resumed,
)
from symmetric_int8 import small_config as shared_small_config
from torch import nn

from qtrain import PerChannel, QConv2d, QLinear, QuantSpec, formats, quantize
from qtrain.models import build_model
from qtrain.observers import MagnitudeAwareClip
from qtrain.quantizer import PerTensor, QParams
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.daint8 import DAInt8, DAInt8Config
from qtrain.train import TrainConfig, read_metrics, train


def small_config(**changes: Any) -> TrainConfig:
    return shared_small_config(**{"epochs": 1, **changes})


def test_grad_weight_per_output_channel_and_grad_input_per_tensor() -> None:
    model = build_recipe("daint8").prepare(
        build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=4)
    )
    layers = [m for m in model.modules() if isinstance(m, QConv2d | QLinear)]
    assert len(layers) == 9
    for layer in layers:
        config = layer.config
        assert config.input_spec == config.weight_spec == QuantSpec(formats.INT8)
        assert config.grad_input_spec.granularity == PerTensor()
        assert config.grad_weight_spec.granularity == PerChannel(1)
        grad_input, grad_weight = layer.observers["grad_input"], layer.observers["grad_weight"]
        assert isinstance(grad_input, MagnitudeAwareClip) and grad_input is not grad_weight


def test_each_output_channel_is_clipped_by_its_own_class() -> None:
    recipe = build_recipe("daint8", {"grad_rounding": "nearest"})
    model = recipe.prepare(nn.Sequential(nn.Linear(16, 2, bias=False)))
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    gaussian = torch.randn(4096, 1)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((4096, 1))
    grad = torch.cat([gaussian, laplace], 1)  # output channel 0 Gaussian, 1 inverted-T
    model(x).backward(grad)
    observer = model[0].observers["grad_weight"]
    assert observer.inverted.tolist() == [0.0, 1.0]
    amax = grad.abs().amax(0)
    # The first step: s_0 = max|g| for both; a second step moves the inverted-T channel's clip.
    model[0].weight.grad = None
    model(x).backward(2 * grad)
    clip = torch.stack([2 * amax[0], 0.2 * amax[1] + 0.8 * 2 * amax[1]])
    assert observer.state[1] == pytest.approx(float(clip[1]))
    spec = QuantSpec(formats.INT8, granularity=PerChannel(1))
    qparams = QParams(clip / 127, torch.zeros(2))
    g_hat = quantize(2 * grad, spec, qparams=qparams)
    x_hat = quantize(x, QuantSpec(formats.INT8))
    torch.testing.assert_close(model[0].weight.grad, g_hat.t() @ x_hat)
    metrics = recipe.metrics()
    assert metrics["inverted_t"] == {"0": 0.5} and metrics["inverted_t_mean"] == 0.5
    assert set(metrics["d_c"]) == {"0"} and "d_c_grad_input" not in metrics  # no input grad


def test_all_gaussian_clips_every_channel_at_its_max() -> None:
    model = build_recipe("daint8", {"all_gaussian": "true"}).prepare(nn.Sequential(nn.Linear(4, 3)))
    grad = torch.distributions.Laplace(0.0, 1.0).sample((512, 3))
    model(torch.randn(512, 4)).backward(grad)
    observer = model[0].observers["grad_weight"]
    assert observer.inverted.tolist() == [0.0, 0.0, 0.0]
    assert observer.all_gaussian and not DAInt8().config.all_gaussian


def test_config_is_validated_with_clear_errors() -> None:
    assert DAInt8Config.from_dict(DAInt8Config(a=0.5).to_dict()) == DAInt8Config(a=0.5)
    for overrides, message in (
        ({"threshold": "1.5"}, r"DAInt8Config.threshold must be in \(0, 1\)"),
        ({"k": "2"}, r"k·A in \[0, 1\]"),
        ({"a": "0"}, "A > 0"),
        ({"interval": "0"}, "DAInt8Config.interval must be a positive int"),
        ({"all_gaussian": "maybe"}, "all_gaussian"),
    ):
        with pytest.raises(RecipeConfigError, match=message):
            build_recipe("daint8", overrides)


def test_bitops_are_eight_by_eight_products() -> None:
    assert_eight_by_eight_bitops("daint8")


@pytest.mark.parametrize("all_gaussian", ["false", "true"])
def test_trains_and_records_inverted_t_fractions(tmp_path: Path, all_gaussian: str) -> None:
    config = small_config(data_kwargs={**SYNTHETIC, "size": 640})
    recipe = build_recipe("daint8", {"interval": "6", "all_gaussian": all_gaussian})
    summary = train(config, recipe, tmp_path)
    assert summary["test_acc"] >= 0.6  # chance is 25%
    assert_gemms_eight_by_eight(summary)
    changes = [r for r in read_metrics(tmp_path) if r["kind"] == "metrics"]
    assert [r["step"] for r in changes] == [1, 7, 13, 19]  # the readings every 6 steps alone
    metrics = changes[-1]["metrics"]
    assert len(metrics["inverted_t"]) == len(metrics["d_c"]) == 4
    assert len(metrics["d_c_grad_input"]) == 3  # the first layer has no grad-input product
    fractions = metrics["inverted_t"].values()
    assert all(0 <= f <= 1 for f in fractions)
    assert (max(fractions) == 0) == (all_gaussian == "true")


def test_recurrence_state_survives_resume(tmp_path: Path) -> None:
    config = small_config(checkpoint_every=3, data_kwargs={**SYNTHETIC, "size": 384})
    killed = killed_and_resumed(config, lambda: DAInt8(DAInt8Config(interval=4)), 7, tmp_path)
    states = [v for k, v in killed.items() if k.endswith("grad_weight.state")]
    assert len(states) == 4 and all(v.numel() > 1 for v in states)  # one per channel
