"""Models for the training harness: ResNet-9 (DAWNBench), the CIFAR ResNets of He et al. 2016
(ResNet-20/38/74), a small CNN, an MLP, a small GPT.

Layers with weights are only nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm and
nn.Embedding, so `quantize_` can swap Linear/Conv2d/BatchNorm2d by type. No model hard-codes
its input size: image models end in adaptive pooling, the MLP reads `input_shape`.

>>> from qtrain.models import build_model
>>> model = build_model("resnet9", input_shape=(3, 32, 32), num_classes=10, width=16)
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "MODELS", "BasicBlock", "CifarResNet", "ResNet9", "build_model"]


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 convolution (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + body(x)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} takes (C, H, W) images, got input_shape {input_shape}")
    c, h, w = input_shape
    return c, h, w


class ResNet9(nn.Module):
    """David Page's ResNet-9 from the DAWNBench CIFAR-10 entry ("How to train your ResNet").

    prep → layer1 (+ residual) → layer2 → layer3 (+ residual) → global max pool → linear,
    with channels w, 2w, 4w, 8w. The logits are scaled by 0.125, as in Page's network, which
    keeps the initial softmax soft. Three 2× max pools then adaptive pooling: works for any
    input of at least 8×8 pixels (28×28 and 32×32 alike).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        w = width
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(
            conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w))),
        )
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(
            conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w))),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = 0.125

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))  # (B, 8w, H/8, W/8)
        return self.classifier(self.pool(x).flatten(1)) * self.logit_scale


def _resnet9(input_shape: Sequence[int], num_classes: int, width: int | None = None) -> nn.Module:
    c, _, _ = _image_shape("resnet9", input_shape)
    return ResNet9(c, num_classes, width or 64)


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or where the shape changes (stride 2, more channels) a
    strided 1×1 convolution with BatchNorm (option B; FracTrain's and SkipNet's code). DFQ
    gates these blocks (``qtrain.recipes.dfq``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016, §4.2), as FracTrain and SBM train them.

    A 3×3 stem of c channels, then three stages of n basic blocks with c, 2c, 4c channels
    (the 2nd and 3rd start with stride 2), global average pooling and a linear classifier:
    depth 6n + 2 (ResNet-20: n = 3, ResNet-38: 6, ResNet-74: 12), c = 16 in the paper.
    Convolutions start from He initialisation (fan-out), as the authors' code. Adaptive
    pooling: any input of at least 4×4 pixels (28×28 and 32×32 alike).
    """

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, base_channels: int = 16
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 38, 74...), got {depth}")
        blocks = (depth - 2) // 6
        c = base_channels
        self.stem = conv_bn(in_channels, c)
        stages, c_in = [], c
        for index, c_out in enumerate((c, 2 * c, 4 * c)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * c, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))  # (B, 4c, H/4, W/4)
        return self.classifier(self.pool(x).flatten(1))


def _cifar_resnet(
    input_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    base_channels: int = 16,
    *,
    depth: int,
) -> nn.Module:
    c, _, _ = _image_shape(f"resnet{depth}", input_shape)
    return CifarResNet(c, num_classes, depth, base_channels * (width or 1))


def _cnn(input_shape: Sequence[int], num_classes: int, width: int | None = None) -> nn.Module:
    """conv_bn(w) → pool → conv_bn(2w) → pool → conv_bn(4w) → global average pool → linear."""
    c, _, _ = _image_shape("cnn", input_shape)
    w = width or 32
    return nn.Sequential(
        conv_bn(c, w),
        nn.MaxPool2d(2),
        conv_bn(w, 2 * w),
        nn.MaxPool2d(2),
        conv_bn(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def _mlp(
    input_shape: Sequence[int], num_classes: int, width: int | None = None, depth: int = 2
) -> nn.Module:
    """Flatten, then `depth` hidden layers of `width` units with ReLU, then a linear head."""
    if depth < 1:
        raise ValueError(f"mlp depth must be >= 1, got {depth}")
    w = width or 256
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, w), nn.ReLU(inplace=True)]
        fan_in = w
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends only to positions <= t."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        # (B, T, 3C) → three (B, n_head, T, C / n_head)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A small GPT-2-style decoder for byte-level language modelling (after nanoGPT).

    Maps token ids (B, T) with T <= block_size to next-token logits (B, T, vocab_size).
    The head is untied by default: a quantizer swaps the head Linear by type, and a tied head
    would share one Parameter between a quantized GEMM and a full-precision embedding lookup.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 n_layer)
        # so the stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        _, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _gpt(
    input_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    n_layer: int = 4,
    n_head: int = 4,
    block_size: int | None = None,
    tie_weights: bool = False,
) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"model 'gpt' takes (seq_len,) token ids, got input_shape {input_shape}")
    return GPT(
        vocab_size=num_classes,
        block_size=block_size or input_shape[0],
        n_layer=n_layer,
        n_head=n_head,
        n_embd=width or 128,
        tie_weights=tie_weights,
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet9": _resnet9,
    "resnet20": functools.partial(_cifar_resnet, depth=20),
    "resnet38": functools.partial(_cifar_resnet, depth=38),
    "resnet74": functools.partial(_cifar_resnet, depth=74),
    "cnn": _cnn,
    "mlp": _mlp,
    "gpt": _gpt,
}
"""Model name → builder(input_shape, num_classes, width, **kw)."""


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    **kw: object,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of `MODELS`: resnet9, resnet20, resnet38, resnet74, cnn, mlp, gpt.
        input_shape: one example's shape, (C, H, W) for images or (seq_len,) for gpt.
        num_classes: output classes (the vocabulary size for gpt).
        width: base width — resnet9: channels of the first layer (64); resnet20/38/74: a
            multiplier of the stages' channels (1: 16, 32, 64); cnn: 32; mlp: hidden units
            (256); gpt: n_embd (128). None takes the default.
        **kw: resnet20/38/74: base_channels (16, before the width multiplier); mlp: depth;
            gpt: n_layer, n_head, block_size (default seq_len), tie_weights.

    >>> build_model("gpt", input_shape=(16,), num_classes=256, width=32, n_head=2)(
    ...     torch.zeros(1, 16, dtype=torch.long)).shape
    torch.Size([1, 16, 256])
    """
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if width is not None and width < 1:
        raise ValueError(f"model width must be >= 1, got {width}")
    return MODELS[name](tuple(input_shape), num_classes, width, **kw)
