"""Tests for qtrain.models: output shapes, ResNet-9's size, GPT causality, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain.models import MODELS, ResNet9, build_model

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
    assert set(MODELS) == {"resnet9", "cnn", "mlp", "gpt"}


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet9", (16,)), ("cnn", (3, 32)), ("gpt", (3, 32, 32))]
)
def test_wrong_input_kind_is_refused(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=f"model '{name}' takes"):
        build_model(name, input_shape=shape, num_classes=10)
