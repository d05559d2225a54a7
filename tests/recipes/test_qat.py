"""QAT with learned step sizes (Esser et al. 2020): the layers it sets up, LSQ's gradients
against torch's own learnable fake-quantize ops through a whole layer, the step
initialisation, BitOPs, the no-decay group for steps, the min/max variant's straight-through
mask, ``--init`` from another run, and the learned steps across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from symmetric_int8 import killed_and_resumed, small_config
from torch import nn

from qtrain import QuantSpec, formats
from qtrain.cost import CostMeter
from qtrain.models import build_model
from qtrain.nn import FakeQuantConv2d, FakeQuantLinear
from qtrain.observers import LSQStep
from qtrain.ops import GemmConfig
from qtrain.quantizer import MinMax
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.qat import QAT, QATConfig
from qtrain.train import (
    CHECKPOINT_FILE,
    TrainConfigError,
    build_optimizer,
    init_from_run,
    load_run,
    train,
)
from qtrain.train.run import build


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_every_gemm_layer_is_fake_quantized_with_learned_steps() -> None:
    model = build_recipe("qat").prepare(
        build_model("resnet9", input_shape=(1, 16, 16), num_classes=10, width=4)
    )
    layers = [m for m in model.modules() if isinstance(m, FakeQuantConv2d | FakeQuantLinear)]
    assert len(layers) == 9
    for layer in layers:
        assert isinstance(layer.observers["weight"], LSQStep)
        assert isinstance(layer.observers["input"], LSQStep)
        assert layer.observers["weight"].step.numel() == layer.weight.shape[0]  # per channel
        assert layer.observers["input"].step.numel() == 1
    assert [layer.role_bits()["forward"] for layer in (layers[0], layers[4], layers[-1])] == [
        (8.0, 8.0),
        (8.0, 4.0),
        (8.0, 8.0),
    ]


def test_a_layer_matches_torch_learnable_fake_quantize_forward_and_backward() -> None:
    # The middle layer at W4 (per output channel) and A8 after a ReLU (unsigned), against the
    # same layer built from torch's LSQ ops with LSQ's gradient scales 1/sqrt(N·Q_P), N the
    # values sharing a step: 16 weights per output channel, 32 × 16 batch values per input.
    torch.manual_seed(0)
    model = QAT().prepare(mlp())
    layer = model[2]
    x = torch.relu(torch.randn(32, 16)).requires_grad_()
    grad = torch.randn(32, 8)
    layer(x).backward(grad)
    w_step = (2 * layer.weight.detach().abs().mean(1) / math.sqrt(7)).clone().requires_grad_()
    x_step = torch.tensor([2 * float(x.detach().abs().mean()) / math.sqrt(255)], requires_grad=True)
    x_ref, w_ref = (
        x.detach().clone().requires_grad_(),
        layer.weight.detach().clone().requires_grad_(),
    )
    x_q = torch._fake_quantize_learnable_per_tensor_affine(
        x_ref, x_step, torch.zeros(1), 0, 255, 1 / math.sqrt(32 * 16 * 255)
    )
    w_q = torch._fake_quantize_learnable_per_channel_affine(
        w_ref, w_step, torch.zeros(8), 0, -7, 7, 1 / math.sqrt(16 * 7)
    )
    F.linear(x_q, w_q, layer.bias.detach()).backward(grad)
    observers = layer.observers
    torch.testing.assert_close(observers["weight"].step.detach(), w_step.detach(), rtol=0, atol=0)
    torch.testing.assert_close(observers["input"].step.detach(), x_step.detach())
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(observers["weight"].step.grad, w_step.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(observers["input"].step.grad, x_step.grad, rtol=1e-5, atol=1e-8)


def test_steps_start_at_twice_the_mean_magnitude_and_inputs_choose_their_sign() -> None:
    torch.manual_seed(1)
    model = QAT(QATConfig(first_last_bits=None)).prepare(mlp())
    x = torch.randn(64, 12)
    model(x)
    first, second = model[0].observers, model[2].observers
    assert not bool(first["input"].unsigned) and bool(second["input"].unsigned)
    expected = 2 * x.abs().mean() / math.sqrt(127)  # signed 8-bit (Q_P = 127)
    assert math.isclose(float(first["input"].step.detach()), float(expected), rel_tol=1e-6)
    per_channel = 2 * model[0].weight.detach().abs().mean(1) / math.sqrt(7)
    torch.testing.assert_close(first["weight"].step.detach(), per_channel, rtol=1e-6, atol=0)
    steps = [float(o["input"].step.detach()) for o in (first, second)]
    model(10 * x)  # initialised once: a later batch does not reset them
    assert [float(o["input"].step.detach()) for o in (first, second)] == steps


def test_bitops_count_low_bit_forward_and_full_precision_gradients() -> None:
    model = QAT(QATConfig(first_last_bits=None)).prepare(
        nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
    )
    meter = CostMeter(model)
    model(torch.randn(4, 6)).sum().backward()
    first, second = 4 * 6 * 5, 4 * 5 * 3
    assert meter.pop().bitops == {
        "forward": (first + second) * 8 * 4,
        "grad_input": second * 32 * 4,
        "grad_weight": (first + second) * 32 * 8,
    }


def test_learned_steps_take_no_weight_decay() -> None:
    config = small_config(weight_decay=5e-4)
    recipe = build_recipe("qat")
    model = recipe.prepare(mlp())
    optimizer = build_optimizer(config, recipe, model)
    steps = {id(m.step) for m in model.modules() if isinstance(m, LSQStep)}
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decays) == len(list(model.parameters()))
    assert {decays[i] for i in steps} == {0.0}
    assert {d for i, d in decays.items() if i not in steps} == {5e-4}


def test_min_max_variant_masks_the_gradient_outside_the_running_range() -> None:
    spec = QuantSpec(formats.Int(8, signed=False), scale=MinMax())
    layer = FakeQuantLinear(4, 2, config=GemmConfig(input_spec=spec), range_momentum=0.0)
    layer(torch.tensor([[0.0, 1.0, 2.0, 0.5]]))  # the running range becomes [0, 2]
    layer.eval()
    x = torch.tensor([[-1.0, 0.5, 1.5, 3.0]], requires_grad=True)
    layer(x).sum().backward()
    inside = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert torch.equal(x.grad, layer.weight.detach().sum(0, keepdim=True) * inside)


def test_gradient_specs_are_refused() -> None:
    spec = QuantSpec(formats.INT8)
    with pytest.raises(Exception, match="grad_input_spec must be None"):
        FakeQuantLinear(4, 2, config=GemmConfig(spec, spec, grad_input_spec=spec))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"w_bits": 1}, "w_bits"),
        ({"a_bits": 17}, "a_bits"),
        ({"w_granularity": "per_row"}, "w_granularity"),
        ({"first_last_bits": 0}, "first_last_bits"),
    ],
)
def test_bad_parameters_are_refused(changes, match) -> None:
    with pytest.raises(RecipeConfigError, match=match):
        QATConfig(**changes)


def test_per_tensor_and_min_max_variants_train(tmp_path: Path) -> None:
    for sets in ({"w_granularity": "per_tensor"}, {"lsq": False}):
        summary = train(small_config(), build_recipe("qat", sets), tmp_path / str(sets))
        assert summary["test_acc"] > 0.75  # four classes; fp32 reaches 0.94


def test_init_loads_the_source_runs_weights_bit_for_bit(tmp_path: Path) -> None:
    train(small_config(), build_recipe("fp32"), tmp_path / "fp32")
    source = load_run(tmp_path / "fp32").model.state_dict()
    config = small_config(epochs=1, init=str(tmp_path / "fp32"))
    dataset, model = build(config, build_recipe("qat"))
    counts = init_from_run(model, config, dataset)
    state = model.state_dict()
    plain = [k for k in source if not k.startswith("observers") and ".observers." not in k]
    assert counts["loaded"] == len(plain) > 0
    assert all(torch.equal(state[k], source[k]) for k in plain)
    assert counts["fresh"] == sum(".observers." in k for k in state)
    # A whole fine-tuning run: the steps start from the loaded weights.
    summary = train(config, build_recipe("qat"), tmp_path / "qat")
    assert summary["test_acc"] > 0.75


def test_init_from_another_model_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    train(small_config(epochs=1), build_recipe("fp32"), tmp_path / "fp32")
    config = small_config(epochs=1, width=8, init=str(tmp_path / "fp32"))
    with pytest.raises(TrainConfigError, match="shape"):
        train(config, build_recipe("qat"), tmp_path / "qat")
    assert not (tmp_path / "qat").exists()
    with pytest.raises(Exception, match="no run directory"):
        train(small_config(init=str(tmp_path / "absent")), build_recipe("qat"), tmp_path / "q2")


def test_learned_steps_survive_a_resume(tmp_path: Path) -> None:
    killed = killed_and_resumed(small_config(checkpoint_every=4), QAT, 6, tmp_path)
    steps = [k for k in killed if k.endswith(".step")]
    assert steps and all(bool(killed[k.replace(".step", ".initialised")]) for k in steps)
    final = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert any(not torch.equal(killed[k], final[k]) for k in steps)  # they kept learning
