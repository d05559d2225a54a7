"""Self-compressing networks (Cséfalvay & Imber 2023): the quantizer q(x, b, e), the size loss,
dead channels silenced then removed without changing the outputs, the optimizer and the
checkpoint across a removal, BitOPs, metrics and defaults that shrink a network."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from symmetric_int8 import killed_and_resumed, small_config
from torch import nn

from qtrain.cost import CostMeter
from qtrain.models import build_model
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.selfcompress import (
    SelfCompress,
    SelfCompressConfig,
    SelfCompressingConv2d,
    self_compress_quantize,
)
from qtrain.train import CHECKPOINT_FILE, build_optimizer, load_run, read_metrics


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=4)


def test_quantizer_follows_the_formula_by_hand() -> None:
    w = torch.tensor([[0.30, -0.20, 0.05, -1.00], [0.30, -0.20, 0.05, -1.00]])
    bits = torch.tensor([3.0, 0.0])
    exponent = torch.tensor([-2.0, -2.0])
    q = self_compress_quantize(w, bits, exponent)
    # 2^2·w = [1.2, -0.8, 0.2, -4]; 3 bits clamp to [-4, 3]; round; × 2^-2.
    assert torch.equal(q[0], torch.tensor([1.0, -1.0, 0.0, -4.0]) / 4)
    assert torch.equal(q[1], torch.zeros(4))  # b = 0: the channel is zero
    negative = self_compress_quantize(w, torch.tensor([-1.0, 2.0]), exponent)
    assert torch.equal(negative[0], torch.zeros(4))  # b below 0 counts as 0


def test_bits_learn_through_the_clamp_and_exponents_through_the_scale() -> None:
    w = torch.tensor([[0.9, -0.1, 0.4]])
    bits = torch.tensor([2.0], requires_grad=True)
    exponent = torch.tensor([-2.0], requires_grad=True)
    self_compress_quantize(w, bits, exponent).square().sum().backward()
    # 0.9 clips at 2^(b-1) - 1 = 1 (×2^-2): raising b lets it grow, so the gradient is negative
    # of the loss' dependence... it is non-zero, as is the exponent's.
    assert bits.grad is not None and float(bits.grad) != 0.0
    assert exponent.grad is not None and float(exponent.grad) != 0.0


def test_bits_above_the_cap_keep_the_output_and_gradients_finite() -> None:
    # A γ = 1.0 ResNet-9 run once threw a b to 137 in one step: 2^(b−1) overflowed fp32 and
    # b's gradient became NaN. b is used at most bits_max and kept there after each step.
    w = torch.tensor([[0.9, -0.1, 0.4], [0.9, -0.1, 0.4]])
    bits = torch.tensor([137.0, 16.0], requires_grad=True)
    exponent = torch.tensor([-2.0, -2.0], requires_grad=True)
    q = self_compress_quantize(w, bits, exponent, bits_max=16.0)
    assert torch.equal(q[0], q[1])  # 137 bits act as 16
    q.square().sum().backward()
    assert bits.grad is not None and bool(torch.isfinite(bits.grad).all())
    assert exponent.grad is not None and bool(torch.isfinite(exponent.grad).all())

    recipe = SelfCompress(SelfCompressConfig(bits_max=8.0))
    model = recipe.prepare(resnet())
    layer = model.prep[0]
    with torch.no_grad():
        layer.bits[0] = 137.0
    assert int(layer.channel_bits()[0]) == 8
    optimizer = build_optimizer(small_config(), recipe, model)
    recipe.on_step_end(0, None, model, optimizer)
    assert float(layer.bits.detach()[0]) == 8.0
    with pytest.raises(RecipeConfigError, match="bits_init"):
        SelfCompressConfig(bits_init=10.0, bits_max=8.0)


def test_every_layer_gets_bits_and_an_exponent_covering_its_range() -> None:
    model = SelfCompress(SelfCompressConfig(bits_init=4)).prepare(resnet())
    layer = model.prep[0]
    assert isinstance(layer, SelfCompressingConv2d)
    assert torch.equal(layer.bits.detach(), torch.full((4,), 4.0))
    amax = layer.weight.detach().abs().flatten(1).amax(1)
    torch.testing.assert_close(torch.exp2(layer.exponent.detach()) * 7, amax)


def test_size_loss_counts_bits_times_live_inputs_over_the_original_weights() -> None:
    recipe = SelfCompress(SelfCompressConfig(gamma=0.5, bits_init=3))
    model = recipe.prepare(resnet())
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "bits"))
    assert recipe.original_weights == weights
    assert math.isclose(
        float(recipe.extra_loss(model).detach()), 0.5 * 3.0, rel_tol=1e-6
    )  # 3 bits each
    with torch.no_grad():
        model.prep[0].bits[0] = -1.0  # one dead channel of the first layer
    expected = (
        3.0
        * (weights - model.prep[0].weight[0].numel() - model.layer1[0][0].weight[:, 0].numel())
        / weights
    )
    assert math.isclose(float(recipe.extra_loss(model).detach()), 0.5 * expected, rel_tol=1e-6)


def test_a_dead_channel_is_removed_once_silent_and_the_outputs_do_not_change() -> None:
    # zero_shift_step silences in one step; a small bits_lr keeps the other channels alive
    recipe = SelfCompress(SelfCompressConfig(zero_shift_step=10.0, bits_lr=0.5))
    model = recipe.prepare(resnet())
    optimizer = build_optimizer(small_config(), recipe, model)
    x = torch.randn(6, 1, 16, 16)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.layer2[0][0].bits[[1, 3]] = 0.0
    assert recipe.on_step_end(0, None, model, optimizer)
    assert model.layer2[0][0].weight.shape[0] == 14 and model.layer2[0][1].num_features == 14
    assert model.layer3[0][0].weight.shape[1] == 14
    state = optimizer.state[model.layer2[0][0].weight]["momentum_buffer"]
    assert state.shape == model.layer2[0][0].weight.shape
    events = recipe.events()
    assert events[0]["event"] == "removed" and events[0]["channels"] == 2


def test_removal_keeps_the_outputs_in_train_and_eval_mode() -> None:
    recipe = SelfCompress(SelfCompressConfig(zero_shift_step=10.0, remove=False))
    model = recipe.prepare(resnet())
    with torch.no_grad():
        model.layer2[0][0].bits[[0, 5]] = -0.5
    recipe.on_step_end(0, None, model, None)  # silenced, not removed (remove=False)
    x = torch.randn(6, 1, 16, 16)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        # A train-mode forward updates BatchNorm's running statistics: run it on a copy.
        return copy.deepcopy(model).train()(x), model.eval()(x)

    before_train, before_eval = outputs()
    recipe.config = SelfCompressConfig(zero_shift_step=10.0)
    assert recipe.on_step_end(1, None, model, None)
    assert model.layer2[0][0].weight.shape[0] == 14
    after_train, after_eval = outputs()
    torch.testing.assert_close(after_train, before_train, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after_eval, before_eval, rtol=1e-5, atol=1e-6)


def test_a_group_keeps_one_channel_and_the_classifier_keeps_its_outputs() -> None:
    recipe = SelfCompress(SelfCompressConfig(zero_shift_step=10.0))
    model = recipe.prepare(resnet())
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "bits"):
                layer.bits.fill_(0.0)
    recipe.on_step_end(0, None, model, None)
    assert all(m.weight.shape[0] >= 1 for m in model.modules() if hasattr(m, "bits"))
    assert model.classifier.weight.shape[0] == 10
    model(torch.randn(2, 1, 16, 16))  # still runs


def test_bitops_count_the_learned_bits() -> None:
    recipe = SelfCompress(SelfCompressConfig(bits_init=2.5))
    model = recipe.prepare(nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)))
    meter = CostMeter(model)
    model(torch.randn(4, 6)).sum().backward()
    first, second = 4 * 6 * 5, 4 * 5 * 3
    assert meter.pop().bitops == {
        "forward": (first + second) * 32 * 3,
        "grad_input": second * 32 * 3,
        "grad_weight": (first + second) * 32 * 32,
    }


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(RecipeConfigError, match="gamma"):
        SelfCompressConfig(gamma=-1.0)
    with pytest.raises(RecipeConfigError, match="exponent_init"):
        build_recipe("selfcompress", {"exponent_init": "max"})


def test_a_run_shrinks_resumes_across_a_removal_and_loads_at_its_shape(tmp_path: Path) -> None:
    config = small_config(epochs=3, checkpoint_every=4)
    make = lambda: SelfCompress(SelfCompressConfig(gamma=2.0, bits_lr=2.0))  # noqa: E731
    # Checkpoints at steps 4 and 8, killed at 10: resumed from a checkpoint saved after a
    # removal (replayed on the fresh model), with removals to come.
    killed = killed_and_resumed(config, make, 10, tmp_path)
    records = read_metrics(tmp_path / "straight")
    steps = [r["step"] for r in records if r.get("event") == "removed"]
    assert min(steps) <= 8 and max(steps) > 10  # record steps count the steps done
    assert killed["4.0.weight"].shape[0] < 16  # the checkpoint holds the compressed shape
    run = load_run(tmp_path / "resumed")
    final = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["model"]
    state = run.model.state_dict()
    assert all(state[k].shape == final[k].shape for k in final)
    assert run.evaluate()["test_acc"] == run.summary["test_acc"]
    assert run.summary["params_final"] < run.summary["params_initial"]
