"""SBM recipe (Banner et al. 2018): config, model preparation, cost, AMP composition, training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import QConv2d, QLinear, RangeBatchNorm2d, Rounding
from qtrain.cost import CostMeter
from qtrain.models import build_model
from qtrain.quantizer import MinMax
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.sbm import SBMConfig
from qtrain.train import TrainConfig, train


def resnet(width: int = 4) -> nn.Module:
    return build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=width)


def test_config_round_trips_through_json() -> None:
    config = SBMConfig(bits=6, grad_bits=7, bifurcation=False, grad_rounding="nearest", amp="bf16")
    assert SBMConfig.from_dict(config.to_dict()) == config
    assert SBMConfig.from_dict(json.loads(config.to_json())) == config


def test_a_config_saved_before_range_bn_was_quantized_loads_with_float_range_bn() -> None:
    saved = SBMConfig().to_dict()
    assert saved["quantize_batchnorm"] is True
    del saved["quantize_batchnorm"]  # configs written before issue 15
    assert SBMConfig.from_dict(saved).quantize_batchnorm is False
    assert build_recipe("sbm8", {"grad_bits": "8"}).config.quantize_batchnorm is True


def test_fields_are_checked_against_their_annotations() -> None:
    config = SBMConfig(range_momentum=0)  # an int for a float field is stored as a float
    assert isinstance(config.range_momentum, float)
    assert '"range_momentum": 0.0' in config.to_json()
    with pytest.raises(RecipeConfigError, match=r"bifurcation must be a bool, got 1 \(int\)"):
        SBMConfig(bifurcation=1)


def test_set_overrides_parse_and_validate() -> None:
    recipe = build_recipe("sbm", {"bits": "6", "grad_bits": "8", "bifurcation": "false"})
    assert (recipe.config.bits, recipe.config.grad_bits, recipe.config.bifurcation) == (6, 8, False)
    with pytest.raises(RecipeConfigError, match="bits must be an int in 2..16, got 17"):
        build_recipe("sbm", {"bits": "17"})
    rounding = "grad_rounding must be one of stochastic, nearest, got 'up'"
    with pytest.raises(RecipeConfigError, match=rounding):
        build_recipe("sbm8", {"grad_rounding": "up"})
    with pytest.raises(RecipeConfigError, match="amp must be one of none, bf16, fp16, got 'fp8'"):
        build_recipe("sbm8", {"amp": "fp8"})
    with pytest.raises(RecipeConfigError, match="unknown parameter 'bitz'"):
        build_recipe("sbm8", {"bitz": "8"})


def test_overrides_given_as_values_not_text() -> None:
    recipe = build_recipe("sbm", {"bits": 6, "bifurcation": False, "range_momentum": 0.2})
    assert (recipe.config.bits, recipe.config.bifurcation) == (6, False)
    assert recipe.config.range_momentum == 0.2
    with pytest.raises(RecipeConfigError, match="'bifurcation': expected true/false, got 1"):
        build_recipe("sbm", {"bifurcation": 1})
    with pytest.raises(RecipeConfigError, match="bits must be an int in 2..16, got 17"):
        build_recipe("sbm", {"bits": 17})


def test_sbm8_quantizes_every_gemm_layer_with_the_paper_specs() -> None:
    model = build_recipe("sbm8").prepare(resnet())
    gemms = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    # First conv and classifier included: every GEMM layer is quantized.
    assert gemms and all(isinstance(m, QLinear | QConv2d) for m in gemms)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert any(isinstance(m, RangeBatchNorm2d) for m in model.modules())
    config = gemms[0].config
    assert config.weight_spec.bits == 8 and isinstance(config.weight_spec.scale, MinMax)
    assert config.input_spec.scale == MinMax(batch_mean=True)
    assert config.grad_input_spec.bits == 8
    assert config.grad_input_spec.rounding is Rounding.STOCHASTIC
    assert config.grad_weight_spec.bits == 16  # bifurcation
    assert config.save_quantized_input


def test_ablation_switches_change_the_layers() -> None:
    no_bifurcation = build_recipe("sbm8", {"bifurcation": "false"}).prepare(resnet())
    layer = next(m for m in no_bifurcation.modules() if isinstance(m, QConv2d))
    assert layer.config.grad_weight_spec == layer.config.grad_input_spec
    nearest = build_recipe("sbm8", {"grad_rounding": "nearest"}).prepare(resnet())
    layer = next(m for m in nearest.modules() if isinstance(m, QConv2d))
    assert layer.config.grad_input_spec.rounding is Rounding.NEAREST
    plain_bn = build_recipe("sbm8", {"range_batchnorm": "false"}).prepare(resnet())
    assert not any(isinstance(m, RangeBatchNorm2d) for m in plain_bn.modules())
    assert any(type(m) is nn.BatchNorm2d for m in plain_bn.modules())
    float_saved = build_recipe("sbm8", {"quantize_saved_activations": "false"}).prepare(resnet())
    layer = next(m for m in float_saved.modules() if isinstance(m, QConv2d))
    assert not layer.config.save_quantized_input


def test_sbm8_quantizes_range_bn_input_and_gradient_unless_switched_off() -> None:
    model = build_recipe("sbm8").prepare(resnet())
    bns = [m for m in model.modules() if isinstance(m, RangeBatchNorm2d)]
    gemm = next(m for m in model.modules() if isinstance(m, QConv2d)).config
    assert bns and all(bn.input_spec == gemm.input_spec for bn in bns)
    assert all(bn.grad_spec == gemm.grad_input_spec for bn in bns)  # 8 bits, SR, per tensor
    assert all(bn.observers.input.momentum == 0.9 for bn in bns)  # running ranges in eval
    # One running-statistics rule, torch's: BN's momentum (weight of the new batch) is 1 − m.
    assert all(bn.momentum == pytest.approx(0.1) for bn in bns)
    layers = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert all(layer.observers.input.momentum == 0.9 for layer in layers)
    authors = build_recipe("sbm8", {"range_momentum": "0.1"}).prepare(resnet())
    assert all(
        bn.momentum == pytest.approx(0.9)
        for bn in authors.modules()
        if isinstance(bn, RangeBatchNorm2d)
    )
    overrides = {"range_bn_spread": "mean_abs", "range_bn_constant_scale": "1.25"}
    mean_abs = build_recipe("sbm8", overrides).prepare(resnet())
    bns = [m for m in mean_abs.modules() if isinstance(m, RangeBatchNorm2d)]
    assert bns and all((bn.spread, bn.constant_scale) == ("mean_abs", 1.25) for bn in bns)
    with pytest.raises(RecipeConfigError, match="range_bn_spread must be one of range, mean_abs"):
        build_recipe("sbm8", {"range_bn_spread": "std"})
    float_bn = build_recipe("sbm8", {"quantize_batchnorm": "false"}).prepare(resnet())
    bns = [m for m in float_bn.modules() if isinstance(m, RangeBatchNorm2d)]
    assert bns and all(bn.input_spec is None and bn.grad_spec is None for bn in bns)


def test_cost_meter_reports_sbm8_bitops_per_role() -> None:
    layer = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    build_recipe("sbm8").prepare(layer)
    meter = CostMeter(layer)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    cost = meter.pop()
    first, second = 4 * 6 * 5, 4 * 5 * 3
    assert cost.macs == {"forward": first + second, "grad_input": second,
                         "grad_weight": first + second}  # fmt: skip
    assert cost.bitops["forward"] == (first + second) * 8 * 8
    assert cost.bitops["grad_input"] == second * 8 * 8  # the input needs no gradient
    assert cost.bitops["grad_weight"] == (first + second) * 16 * 8


def test_sbm8_keeps_a_channels_last_batch_channels_last_end_to_end(backend: str) -> None:
    # The trainer's augmented batches are channels_last (one input channel): torch then runs
    # an fp32 net NHWC, and so must sbm8's layers (quantizers, Range BN, compact layers),
    # forward and backward. With nearest gradient rounding the step is that of the NCHW batch
    # up to the convolutions' summation order.
    # (the backend fixture runs it on the reference kernels and on AUTO's, i.e. cpu_fused)
    recipe = build_recipe("sbm8", {"grad_rounding": "nearest"})
    torch.manual_seed(0)
    base = recipe.prepare(build_model("resnet9", input_shape=(3, 16, 16), num_classes=10, width=4))
    images = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 10, (8,))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = copy.deepcopy(base)
        layouts: list[bool] = []
        for module in model.modules():
            if isinstance(module, (QConv2d, RangeBatchNorm2d, nn.MaxPool2d)):
                module.register_forward_pre_hook(
                    lambda _, args, seen=layouts, wanted=layout: seen.append(
                        args[0].is_contiguous(memory_format=wanted)
                    )
                )
        x = images.contiguous(memory_format=layout).detach().requires_grad_()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        assert all(layouts) and x.grad.is_contiguous(memory_format=layout)
        results.append([loss, x.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(
            got, want, rtol=2e-3, atol=2e-3 * float(want.detach().abs().max())
        )


def test_sbm8_step_with_bf16_autocast() -> None:
    recipe = build_recipe("sbm8", {"amp": "bf16"})
    model = recipe.prepare(resnet())
    assert recipe.grad_scaler("cpu") is None
    with recipe.autocast("cpu"):
        out = model(torch.randn(8, 1, 16, 16))
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), torch.randint(0, 10, (8,))).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fp16_overflow_reaches_the_grad_scaler_which_skips_the_step() -> None:
    recipe = build_recipe("sbm8", {"amp": "fp16"})
    model = recipe.prepare(resnet())
    scaler = recipe.grad_scaler("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with recipe.autocast("cpu"):
        out = model(torch.randn(8, 1, 16, 16))
    # A loss scaled past fp16's range: the layer gradients overflow to inf in backward; the
    # gradient quantizers must pass inf on (not raise) so the scaler can skip the step.
    loss = F.cross_entropy(out.float(), torch.randint(0, 10, (8,))) * 1e30
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 65536.0  # the overflow was seen and the scale backed off
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_sbm8_trains_on_synthetic_data(tmp_path: Path) -> None:
    config = TrainConfig(
        model="cnn", data="synthetic", epochs=1, width=8, batch_size=32, quiet=True,
        data_kwargs={"shape": [1, 16, 16], "size": 2000, "test_size": 500},
    )  # fmt: skip
    summary = train(config, build_recipe("sbm8"), tmp_path / "run")
    # Chance is 10%; fp32 measures ~99.8% on this data (tests/test_train.py). 8-bit training
    # should stay far above chance; 60% is the same floor the fp32 test uses.
    assert summary["test_acc"] >= 0.6
    # Per layer: forward 8×8 and grad-weight 16×8 on F MACs each, grad-input 8×8 on G ≤ F MACs
    # (G = 0 for the first layer): ratio (192F + 64G) / (1024(2F + G)) lies in
    # [256/3072 (G = F), 192/2048 (G = 0)].
    ratio = summary["bitops_train"] / summary["bitops_fp32_equiv"]
    assert 256 / 3072 < ratio < 192 / 2048
    assert summary["metrics"]["fw_bits"] == 8
