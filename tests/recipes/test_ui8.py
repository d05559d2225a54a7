"""Unified INT8 (Zhu et al. 2020): the layers it sets up, the clip applied in backward, the
per-layer lr scaling on top of the run's schedule, its ablation switches, BitOPs, metrics and
the report figure, and the clip state across a resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from symmetric_int8 import (
    SYNTHETIC,
    assert_eight_by_eight_bitops,
    assert_gemms_eight_by_eight,
    killed_and_resumed,
    small_config,
)
from torch import nn

from qtrain import QConv2d, QLinear, QuantSpec, RangeBatchNorm2d, Rounding, formats, quantize
from qtrain.models import build_model
from qtrain.observers import CosineClip, GradientClip
from qtrain.quantizer import Clip, PerTensor
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.ui8 import UI8, UI8Config
from qtrain.report import write_report
from qtrain.train import read_metrics, train
from qtrain.train.config import lr_factor


def resnet() -> nn.Module:
    return build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=4)


def test_every_gemm_layer_is_symmetric_int8_with_one_clipped_gradient_copy() -> None:
    model = build_recipe("ui8").prepare(resnet())
    layers = [m for m in model.modules() if isinstance(m, QConv2d | QLinear)]
    assert len(layers) == sum(1 for m in resnet().modules() if isinstance(m, nn.Conv2d | nn.Linear))
    for layer in layers:
        config = layer.config
        assert config.input_spec == config.weight_spec == QuantSpec(formats.INT8)
        assert config.grad_input_spec == config.grad_weight_spec
        assert config.grad_input_spec.rounding is Rounding.STOCHASTIC
        assert config.grad_input_spec.granularity == PerTensor()
        assert isinstance(layer.observers["grad_input"], CosineClip)
        assert "grad_weight" not in layer.observers  # one copy of g_l serves both products
    assert not any(isinstance(m, RangeBatchNorm2d) for m in model.modules())  # BN stays float
    plain = build_recipe("ui8", {"clipping": "false"}).prepare(resnet())
    observer = next(m for m in plain.modules() if isinstance(m, QConv2d)).observers["grad_input"]
    assert type(observer) is GradientClip


def test_the_searched_clip_quantizes_both_backward_products() -> None:
    recipe = build_recipe("ui8", {"grad_rounding": "nearest"})
    model = recipe.prepare(nn.Sequential(nn.Linear(16, 16, bias=False)))
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    grad = torch.distributions.StudentT(2.0).sample((2048, 16)) * 1e-3  # long tails: clip pays
    model(x).backward(grad)
    clip = float(model[0].observers["grad_input"].clip)
    assert 0 < clip < float(grad.abs().max())
    g_hat = quantize(grad, QuantSpec(formats.INT8, scale=Clip(clip)))
    x_hat = quantize(x, QuantSpec(formats.INT8))
    torch.testing.assert_close(model[0].weight.grad, g_hat.t() @ x_hat)


def test_lr_scaling_groups_each_layer_weight_and_scales_the_scheduled_lr() -> None:
    recipe = UI8()
    model = recipe.prepare(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    groups = recipe.param_groups(model)
    assert [g.get("layer") for g in groups] == ["0", "2", None]
    assert groups[0]["params"][0] is model[0].weight
    assert {id(p) for p in groups[2]["params"]} == {id(model[0].bias), id(model[2].bias)}
    optimizer = torch.optim.Adam([{**g, "lr": 0.03} for g in groups])  # any torch optimizer
    model[0].observers["grad_input"].distance.fill_(0.05)
    model[2].observers["grad_input"].distance.fill_(0.5)
    recipe.before_optimizer_step(0, model, optimizer)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.03 * math.exp(-1), 0.03 * 0.1, 0.03])
    metrics = recipe.metrics()
    assert metrics["lr_scale"] == pytest.approx({"0": math.exp(-1), "2": 0.1})
    assert metrics["d_c"] == pytest.approx({"0": 0.05, "2": 0.5})
    assert UI8(UI8Config(lr_scaling=False)).param_groups(model) is None


class Recorder(UI8):
    """Records each step's group learning rates after the lr scaling."""

    def __init__(self, config: UI8Config | None = None) -> None:
        super().__init__(config)
        self.lrs: list[dict[str, float]] = []

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        super().before_optimizer_step(step, model, optimizer)
        self.lrs.append({g.get("layer", "rest"): g["lr"] for g in optimizer.param_groups})


def test_lr_scaling_composes_with_the_runs_schedule(tmp_path: Path) -> None:
    config = small_config(epochs=1, schedule="cosine", optimizer="adamw", lr=0.01)
    recipe = Recorder(UI8Config(interval=3))
    train(config, recipe, tmp_path / "run")
    total = len(recipe.lrs)
    for step, lrs in enumerate(recipe.lrs):
        scheduled = 0.01 * lr_factor("cosine", step, total, config.warmup_fraction)
        assert lrs["rest"] == pytest.approx(scheduled)
        for layer, lr in lrs.items():
            if layer != "rest":  # φ of the d_c measured at the last search, never compounded
                assert 0.1 * scheduled <= lr <= scheduled
    last = recipe.metrics()["lr_scale"]
    assert {k: v * recipe.lrs[-1]["rest"] for k, v in last.items()} == pytest.approx(
        {k: v for k, v in recipe.lrs[-1].items() if k != "rest"}
    )


def test_config_is_validated_with_clear_errors() -> None:
    assert UI8Config.from_dict(UI8Config(interval=7).to_dict()) == UI8Config(interval=7)
    for overrides, message in (
        ({"interval": "0"}, "UI8Config.interval must be a positive int"),
        ({"beta": "0"}, r"UI8Config.beta must be a number in \(0, 1\]"),
        ({"alpha": "-1"}, "UI8Config.alpha must be a number in"),
        ({"bits": "1"}, "UI8Config.bits must be an int in 2..16"),
        ({"grad_rounding": "up"}, "grad_rounding"),
        ({"clip": "true"}, "unknown parameter 'clip'"),
    ):
        with pytest.raises(RecipeConfigError, match=message):
            build_recipe("ui8", overrides)


def test_bitops_are_eight_by_eight_products() -> None:
    assert_eight_by_eight_bitops("ui8")


@pytest.mark.parametrize(
    "overrides", [{}, {"lr_scaling": "false"}, {"clipping": "false", "lr_scaling": "false"}]
)
def test_trains_and_records_per_layer_metrics(tmp_path: Path, overrides: dict[str, str]) -> None:
    config = small_config(epochs=1, data_kwargs={**SYNTHETIC, "size": 640})
    summary = train(config, build_recipe("ui8", {"interval": "6", **overrides}), tmp_path)
    assert summary["test_acc"] >= 0.6  # chance is 25%
    assert_gemms_eight_by_eight(summary)
    records = read_metrics(tmp_path)
    changes = [r for r in records if r["kind"] == "metrics"]
    # The per-layer values change at the searches alone (steps 1, 7, 13, 19 of 20).
    assert [r["step"] for r in changes] == [1, 7, 13, 19]
    layers = set(changes[-1]["metrics"]["d_c"])
    assert len(layers) == 4 and all(0 < d < 0.1 for d in changes[-1]["metrics"]["d_c"].values())
    assert ("clip" in changes[-1]["metrics"]) == (overrides.get("clipping") != "false")
    assert ("lr_scale" in changes[-1]["metrics"]) == (overrides.get("lr_scaling") != "false")
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(
        not isinstance(v, dict) for r in steps for v in r["metrics"].values()
    )  # step records carry the scalar summaries only
    if not overrides:  # the report's diagnostic figure (drawn alike for every variant)
        report = write_report(tmp_path).read_text()
        assert "![d_c per layer](metrics_d_c.png)" in report
        assert (tmp_path / "metrics_d_c.png").exists()


def test_clip_state_survives_resume(tmp_path: Path) -> None:
    # Searches at steps 0, 4, 8 of 12: one before and one after the kill at step 7.
    config = small_config(checkpoint_every=3, epochs=1, data_kwargs={**SYNTHETIC, "size": 384})
    killed = killed_and_resumed(config, lambda: UI8(UI8Config(interval=4)), 7, tmp_path)
    clips = [v for k, v in killed.items() if k.endswith("grad_input.clip")]
    assert len(clips) == 4 and all(float(v) > 0 for v in clips)
