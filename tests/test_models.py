"""Tests for qtrain.models: output shapes, ResNet-9's size, GPT causality, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain.models import MODELS, BasicBlock, CifarResNet, ResNet9, build_model

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]
# The only layer types with weights, so a quantizer can swap Linear/Conv2d/BatchNorm2d by type.
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding)


def weight_layers_only(model: nn.Module) -> bool:
    return all(
        isinstance(m, WEIGHT_LAYERS)
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    )


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize(("name", "width"), [("resnet9", 8), ("cnn", 8), ("mlp", 32)])
def test_image_model_output_shape(name: str, width: int, shape: tuple[int, int, int]) -> None:
    model = build_model(name, input_shape=shape, num_classes=7, width=width)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert weight_layers_only(model)


def test_resnet9_parameter_count_matches_dawnbench() -> None:
    model = build_model("resnet9", input_shape=(3, 32, 32), num_classes=10)
    conv = 3 * 3 * (3 * 64 + 64 * 128 + 2 * 128 * 128 + 128 * 256 + 256 * 512 + 2 * 512 * 512)
    batchnorm = 2 * (64 + 128 + 2 * 128 + 256 + 512 + 2 * 512)  # weight and bias per channel
    linear = 512 * 10  # no bias
    assert conv + batchnorm + linear == 6_573_120
    assert sum(p.numel() for p in model.parameters()) == 6_573_120


def test_resnet9_width_scales_channels() -> None:
    model = build_model("resnet9", input_shape=(1, 28, 28), num_classes=10, width=16)
    assert isinstance(model, ResNet9) and model.classifier.in_features == 128


def test_mlp_depth() -> None:
    model = build_model("mlp", input_shape=(1, 4, 4), num_classes=3, width=5, depth=3)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [5, 5, 5, 3]


def gpt(**kw: object) -> nn.Module:
    return build_model(
        "gpt", input_shape=(16,), num_classes=256, width=32, n_layer=2, n_head=4, **kw
    )


def test_gpt_output_shape() -> None:
    model = gpt()
    idx = torch.randint(256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model(idx[:, :5]).shape == (3, 5, 256)  # shorter than block_size is fine
    assert weight_layers_only(model)
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = gpt().eval()
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_gpt_weight_tying() -> None:
    tied, untied = gpt(tie_weights=True), gpt()
    assert tied.head.weight is tied.token_embedding.weight
    assert untied.head.weight is not untied.token_embedding.weight


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="model: unknown model 'vgg'.*resnet9.*gpt"):
        build_model("vgg", input_shape=(3, 32, 32), num_classes=10)
    assert set(MODELS) == {"resnet9", "resnet20", "resnet38", "resnet74", "cnn", "mlp", "gpt"}


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet9", (16,)), ("resnet20", (3, 32)), ("cnn", (3, 32)), ("gpt", (3, 32, 32))],
)
def test_wrong_input_kind_is_refused(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=f"model '{name}' takes"):
        build_model(name, input_shape=shape, num_classes=10)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("depth", [20, 38, 74])
def test_cifar_resnets_output_shape_and_depth(depth: int, shape: tuple[int, int, int]) -> None:
    model = build_model(f"resnet{depth}", input_shape=shape, num_classes=7, base_channels=2)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert weight_layers_only(model)
    # Depth 6n + 2 counts the weighted layers on the main path: 3×3 convs and the classifier.
    main_path = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(main_path) + 1 == depth
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == (depth - 2) // 2


def test_resnet20_parameter_count() -> None:
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    convs = 9 * (3 * 16 + 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64)
    shortcuts = 16 * 32 + 32 * 64  # the 1×1 convs where a stage starts
    batchnorm = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)
    linear = 64 * 10 + 10
    assert convs + shortcuts + batchnorm + linear == 272_474  # He et al.: 0.27M
    assert sum(p.numel() for p in model.parameters()) == 272_474


def test_cifar_resnet_width_multiplies_the_channels_and_depth_is_checked() -> None:
    model = build_model("resnet20", input_shape=(1, 28, 28), num_classes=10, width=2)
    assert isinstance(model, CifarResNet) and model.classifier.in_features == 128
    assert [stage[0].conv1.out_channels for stage in model.stages] == [32, 64, 128]
    with pytest.raises(ValueError, match="depth 6n \\+ 2"):
        CifarResNet(3, 10, depth=21)
