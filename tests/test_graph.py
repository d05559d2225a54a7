"""qtrain.graph: channel groups found on fx traces, and channel removal in place."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import quantize_
from qtrain.graph import ChannelGroup, GraphError, channel_groups, remove_channels
from qtrain.models import build_model
from qtrain.nn import QConv2d
from qtrain.observers import LSQStep

SHAPE = (1, 16, 16)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=SHAPE, num_classes=10, width=4)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, *SHAPE, generator=generator), torch.randint(10, (8,), generator=generator)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    images, labels = _batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _keep(group: ChannelGroup) -> torch.Tensor:
    return torch.arange(group.channels) % 3 != 1  # removes channels 1, 4, 7, ...


def _silence_consumers(model: nn.Module, group: ChannelGroup, removed: torch.Tensor) -> None:
    """Zero the weights that read the removed channels."""
    for name in group.consumers:
        model.get_submodule(name).weight.data[:, removed] = 0


def _silence_producers(model: nn.Module, group: ChannelGroup, removed: torch.Tensor) -> None:
    """Zero the removed channels' producer weights, and shift their norms so ReLU outputs 0."""
    for name in group.producers:
        producer = model.get_submodule(name)
        producer.weight.data[removed] = 0
        if producer.bias is not None:
            producer.bias.data[removed] = 0
    for name in group.norms:
        norm = model.get_submodule(name)
        norm.bias.data[removed] = -1.0
        norm.running_mean[removed] = 0.0


RESNET9_GROUPS = [
    ChannelGroup(("prep.0",), ("prep.1",), ("layer1.0.0",), 4, True),
    ChannelGroup(
        ("layer1.0.0", "layer1.2.body.1.0"),
        ("layer1.0.1", "layer1.2.body.1.1"),
        ("layer1.2.body.0.0", "layer2.0.0"),
        8,
        True,
    ),
    ChannelGroup(("layer1.2.body.0.0",), ("layer1.2.body.0.1",), ("layer1.2.body.1.0",), 8, True),
    ChannelGroup(("layer2.0.0",), ("layer2.0.1",), ("layer3.0.0",), 16, True),
    ChannelGroup(
        ("layer3.0.0", "layer3.2.body.1.0"),
        ("layer3.0.1", "layer3.2.body.1.1"),
        ("layer3.2.body.0.0", "classifier"),
        32,
        True,
    ),
    ChannelGroup(("layer3.2.body.0.0",), ("layer3.2.body.0.1",), ("layer3.2.body.1.0",), 32, True),
    ChannelGroup(("classifier",), (), (), 10, False, "reaches the model output"),
]
CNN_GROUPS = [
    ChannelGroup(("0.0",), ("0.1",), ("2.0",), 4, True),
    ChannelGroup(("2.0",), ("2.1",), ("4.0",), 8, True),
    ChannelGroup(("4.0",), ("4.1",), ("7",), 16, True),
    ChannelGroup(("7",), (), (), 10, False, "reaches the model output"),
]
MLP_GROUPS = [
    ChannelGroup(("1",), (), ("3",), 4, True),
    ChannelGroup(("3",), (), ("5",), 4, True),
    ChannelGroup(("5",), (), (), 10, False, "reaches the model output"),
]
GROUPS = {"resnet9": RESNET9_GROUPS, "cnn": CNN_GROUPS, "mlp": MLP_GROUPS}


@pytest.mark.parametrize("name", GROUPS)
def test_groups_follow_the_architecture(name: str) -> None:
    # ResNet-9: each residual ties the conv before it to the body's second conv; the last
    # group reaches the classifier through max pooling to 1×1 and flatten(1).
    assert channel_groups(_model(name)) == GROUPS[name]


def test_quantized_layers_are_followed_by_type() -> None:
    model = quantize_(_model("resnet9"), "sbm8")  # QConv2d, QLinear, RangeBatchNorm2d
    assert channel_groups(model) == RESNET9_GROUPS
    group = RESNET9_GROUPS[1]
    remove_channels(model, None, group, torch.tensor([0, 5]))
    assert model.get_submodule("layer1.2.body.1.1").running_var.shape == (2,)
    model(_batch()[0]).sum().backward()


def test_gpt_is_refused_with_its_name() -> None:
    gpt = build_model("gpt", input_shape=(16,), num_classes=256, width=32, n_head=2)
    with pytest.raises(GraphError, match="torch.fx trace of GPT"):
        channel_groups(gpt)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class _View(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(18, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).view(x.shape[0], -1))


@pytest.mark.parametrize(
    "model, reason",
    [
        (_Concat(), "used by cat"),
        (_View(), "used by view"),
        (nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=2)), "grouped convolution"),
        (nn.Sequential(nn.Conv2d(1, 4, 1), nn.Linear(5, 3)), "read by linear '1' over the last"),
    ],
)
def test_ops_the_walk_does_not_follow_end_removability(model: nn.Module, reason: str) -> None:
    first = channel_groups(model)[0]
    assert not first.removable and reason in first.reason
    with pytest.raises(GraphError, match="stay"):
        remove_channels(model, None, first, torch.tensor([0]))


def test_flatten_of_a_map_needs_its_shape() -> None:
    pooled_by_conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(GraphError, match="pass example_input"):
        channel_groups(pooled_by_conv)
    first = channel_groups(pooled_by_conv, example_input=torch.zeros(1, 1, 3, 3))[0]
    assert (first.consumers, first.removable) == (("3",), True)
    spatial = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    first = channel_groups(spatial, example_input=torch.zeros(1, 1, 4, 4))[0]
    assert not first.removable and "flattened" in first.reason


@pytest.mark.parametrize("silence", [_silence_consumers, _silence_producers])
@pytest.mark.parametrize("name", GROUPS)
def test_removing_silent_channels_keeps_outputs(name: str, silence: Callable) -> None:
    model = _model(name)
    images, _ = _batch()
    model(images)  # running statistics away from their initial values
    removable = [group for group in channel_groups(model) if group.removable]
    for group in removable:
        silence(model, group, ~_keep(group))
    before = copy.deepcopy(model)
    for group in removable:
        remove_channels(model, None, group, _keep(group))
    for training in (False, True):
        torch.testing.assert_close(model.train(training)(images), before.train(training)(images))
    expected = [
        dataclasses.replace(group, channels=int(_keep(group).sum())) if group.removable else group
        for group in GROUPS[name]
    ]
    assert channel_groups(model) == expected


def test_residual_group_slices_every_member() -> None:
    model = _model("resnet9")
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    parameters = list(model.parameters())
    keep = torch.tensor([0, 3, 5])
    group = remove_channels(model, None, RESNET9_GROUPS[1], keep)
    assert group == dataclasses.replace(RESNET9_GROUPS[1], channels=3)
    for name in ("layer1.0.0", "layer1.2.body.1.0"):
        producer = model.get_submodule(name)
        assert producer.out_channels == 3
        torch.testing.assert_close(producer.weight, weights[f"{name}.weight"][keep], rtol=0, atol=0)
    for name in ("layer1.0.1", "layer1.2.body.1.1"):
        norm = model.get_submodule(name)
        assert norm.num_features == 3
        assert [t.shape for t in (norm.weight, norm.bias, norm.running_mean)] == [(3,)] * 3
    for name in ("layer1.2.body.0.0", "layer2.0.0"):
        consumer = model.get_submodule(name)
        assert consumer.in_channels == 3
        expected = weights[f"{name}.weight"][:, keep]
        torch.testing.assert_close(consumer.weight, expected, rtol=0, atol=0)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    model(_batch()[0]).sum().backward()  # trains on at the new shapes
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(model.state_dict())
    images = _batch()[0]
    torch.testing.assert_close(reloaded.eval()(images), model.eval()(images))


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), ["momentum_buffer"]),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), ["exp_avg", "exp_avg_sq"]),
}


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_optimizer_state_follows_and_training_continues(optimizer_name: str) -> None:
    kind, settings, keys = OPTIMIZERS[optimizer_name]
    model = _model("resnet9")
    optimizer = kind(model.parameters(), **settings)
    for seed in (1, 2):
        _step(model, optimizer, seed)
    group, keep = RESNET9_GROUPS[1], _keep(RESNET9_GROUPS[1])
    _silence_consumers(model, group, ~keep)
    reference = copy.deepcopy(model)
    reference_optimizer = kind(reference.parameters(), **settings)
    # A copy: load_state_dict keeps the very state tensors, which steps update in place.
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    remove_channels(model, optimizer, group, keep)
    for parameter in model.parameters():
        for key in keys:
            assert optimizer.state[parameter][key].shape == parameter.shape
    old = reference_optimizer.state
    kept_entries = {"layer1.0.0": keep, "layer1.0.1": keep, "layer2.0.0": (slice(None), keep)}
    for name, kept in kept_entries.items():
        old_weight = reference.get_submodule(name).weight
        for key in keys:
            state = optimizer.state[model.get_submodule(name).weight][key]
            torch.testing.assert_close(state, old[old_weight][key][kept], rtol=0, atol=0)

    # One step after removal = the same step before removal (removed weights zero), then removal.
    _step(model, optimizer, seed=3)
    _step(reference, reference_optimizer, seed=3)
    remove_channels(reference, reference_optimizer, group, keep)
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    for parameter, reference_parameter in pairs:
        torch.testing.assert_close(parameter, reference_parameter)
        state, reference_state = optimizer.state[parameter], old[reference_parameter]
        for key in [*keys, "step"] if "step" in state else keys:
            torch.testing.assert_close(state[key], reference_state[key])


def test_a_producer_per_channel_tensors_follow_its_output_channels() -> None:
    # Learned per-channel tensors of a producer (shape (C, 1, 1, 1)) are sliced, per-tensor
    # ones stay; a GEMM's input observer's per-channel tensors follow its input channels.
    model = nn.Sequential(
        QConv2d(4, 4, 3, observers={"input": LSQStep(channels=4)}),
        nn.BatchNorm2d(4),
        QConv2d(4, 4, 3, observers={"input": LSQStep(channels=4)}),
    )
    model[1].observers = nn.ModuleDict({"input": LSQStep(channels=4)})  # as Range BN's
    model[0].bits = nn.Parameter(torch.arange(4.0).view(4, 1, 1, 1))
    model[0].exponent = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)  # creates the momentum buffers
    optimizer.step()
    group = channel_groups(model)[0]
    assert (group.producers, group.consumers) == (("0",), ("2",))
    remove_channels(model, optimizer, group, torch.tensor([1, 3]))
    assert model[0].bits.flatten().tolist() == [1.0, 3.0]
    assert optimizer.state[model[0].bits]["momentum_buffer"].shape == (2, 1, 1, 1)
    assert model[0].exponent.shape == (1,)
    assert model[0].observers.input.step.shape == (4,)  # the model's input channels
    assert model[2].observers.input.step.shape == (2,)
    assert model[1].observers.input.step.shape == (2,)  # a norm's input: the same channels
    assert (model[0].weight.shape, model[2].weight.shape) == ((2, 4, 3, 3), (4, 2, 3, 3))


def test_refusals() -> None:
    model = _model("cnn")
    group = CNN_GROUPS[0]
    with pytest.raises(ValueError, match="remove all 4 channels of 0.0; a group keeps at least"):
        remove_channels(model, None, group, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="remove all 4 channels"):
        remove_channels(model, None, group, torch.tensor([], dtype=torch.long))
    for keep, message in (
        (torch.ones(3, dtype=torch.bool), "shape \\(4,\\)"),
        (torch.tensor([0, 0]), "distinct"),
        (torch.tensor([4]), "0..3"),
        (torch.tensor([0.0]), "bool mask or 1-d integer"),
    ):
        with pytest.raises(GraphError, match=message):
            remove_channels(model, None, group, keep)
    remove_channels(model, None, group, torch.tensor([0, 1]))
    with pytest.raises(GraphError, match="stale group"):
        remove_channels(model, None, group, torch.tensor([0, 1]))
    with pytest.raises(GraphError, match="reaches the model output"):
        remove_channels(model, None, CNN_GROUPS[-1], torch.tensor([0]))
