"""Self-compressing neural networks — Cséfalvay & Imber, arXiv 2301.13142 (2023)
(METHODS.md §6).

Every conv and linear weight is quantized per output channel i with a learnable bit depth b_i
(real, used as max(b_i, 0)) and exponent e_i, straight-through for the rounding:

    q(w, b, e) = 2^e · round(clamp(2^−e·w, −2^(b−1), 2^(b−1) − 1))

and the loss adds the network's size: L = L0 + γ·Q, Q = Σ_layers z / W0 (bits per weight of
the original network), z = I·kh·kw·Σ_i max(b_i, 0), where I counts the layer's input channels
still alive. A channel whose b reaches 0 (in every producer of its channel group: residual
branches are tied, ``qtrain.graph``) computes zeros; its output shift (BatchNorm's β, a bias) is
then pushed to exactly zero by soft-thresholding (the paper's L1 push, ``zero_shift_step`` per
step) with the running mean zeroed, and once the channel's output is exactly zero it is removed
for real — from its producers, norms and consumers, with its optimizer state
(``qtrain.graph.remove_channels``) — so the network, and each epoch, gets smaller as it trains.

Readings where the paper leaves a choice (docs/RECIPES.md): b starts at ``bits_init`` and e at
the exponent whose grid covers each channel's max|w| (``exponent_init="auto"``); b and e
learn in their own optimizer group (``bits_lr``, no weight decay); the first layer's input
channels and the classifier's outputs are never removed; a group keeps at least one channel.
BitOPs and model bits count ceil(max(b_i, 0)) bits per weight of channel i, plus a 32-bit
exponent per channel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.graph import ChannelGroup, channel_groups, remove_channels
from qtrain.nn import copy_conv_attributes, plain_conv2d, plain_linear
from qtrain.ops import Precision
from qtrain.protocol import QuantizedWeight
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_number

BITS_MAX = 16.0  # the default cap on b (``SelfCompressConfig.bits_max``)


def self_compress_quantize(
    weight: torch.Tensor, bits: torch.Tensor, exponent: torch.Tensor, bits_max: float = BITS_MAX
) -> torch.Tensor:
    """q(w, b, e) per output channel (dim 0), b used as min(max(b, 0), bits_max); the
    straight-through estimator for round, so b learns through the clamp's bounds and e through
    2^±e. The cap keeps 2^(b−1) finite: b's gradient grows as 2^b while the bounds clip, so a
    large step could otherwise throw b past fp32's exponent range (inf bounds, NaN gradients)."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    b, e = bits.clamp(0.0, bits_max).view(shape), exponent.view(shape)
    high = torch.exp2(b - 1)
    clamped = torch.minimum(torch.maximum(torch.exp2(-e) * weight, -high), high - 1)
    return torch.exp2(e) * (clamped + (torch.round(clamped) - clamped).detach())


class _SelfCompressing:
    """Mixin: a conv/linear with per-output-channel ``bits`` and ``exponent`` parameters that
    follows the quantized-module protocol (``qtrain.protocol``)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    bits: nn.Parameter
    exponent: nn.Parameter
    bits_max: float = BITS_MAX

    def _init_self_compressing(
        self, bits: float, exponent: float | str, bits_max: float = BITS_MAX
    ) -> None:
        channels = self.weight.shape[0]
        self.bits_max = float(bits_max)
        with torch.no_grad():
            if exponent == "auto":  # the grid of b bits just covers each channel's max|w|
                amax = self.weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
                e = torch.log2(amax / max(2 ** (bits - 1) - 1, 0.5))
            else:
                e = torch.full((channels,), float(exponent))
        device = self.weight.device
        self.bits = nn.Parameter(torch.full((channels,), float(bits), device=device))
        self.exponent = nn.Parameter(e.to(device))

    def quantized_weight_values(self) -> torch.Tensor:
        return self_compress_quantize(self.weight, self.bits, self.exponent, self.bits_max)

    def used_bits(self) -> torch.Tensor:
        """b as the quantizer and the size loss use it: min(max(b, 0), bits_max) (in the graph)."""
        return self.bits.clamp(0.0, self.bits_max)

    def channel_bits(self) -> torch.Tensor:
        """Bits each output channel's weights are stored in: ceil(used b)."""
        return torch.ceil(self.used_bits().detach())

    # ---- the quantized-module protocol ----
    def role_bits(self, float_bits: float = 32.0) -> dict[str, tuple[float, float]]:
        weight_bits = float(self.channel_bits().mean()) if self.bits.numel() else 0.0
        return {
            "forward": (float_bits, weight_bits),
            "grad_input": (float_bits, weight_bits),
            "grad_weight": (float_bits, float_bits),
        }

    def sample_role_bits(self) -> None:
        return None

    def weight_storage_bits(self) -> int:
        fan_in = math.prod(self.weight.shape[1:])
        return int(self.channel_bits().sum()) * fan_in + 32 * self.weight.shape[0]

    def quantized_weight(self) -> QuantizedWeight:
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        scale = torch.exp2(self.exponent.detach()).view(shape)
        levels = torch.round(self.quantized_weight_values().detach() / scale).to(torch.int32)
        bits = max(int(self.channel_bits().max()), 1) if self.bits.numel() else 1
        return QuantizedWeight(levels, scale, torch.zeros_like(scale), bits, True)

    def set_precision(self, precision: Precision | None) -> None:
        if precision is not None:
            raise RecipeConfigError(
                f"{type(self).__name__} learns its bit depths: a precision schedule cannot set them"
            )

    def raise_floor(self) -> bool:
        return False  # learned bit depths: the guard has no step to raise

    def floor(self) -> dict[str, float]:
        return {}

    def set_floor(self, floor: dict[str, float]) -> None:
        if floor:
            raise RecipeConfigError(f"{type(self).__name__} has no precision floor to set")


class SelfCompressingConv2d(_SelfCompressing, nn.Conv2d):
    """``nn.Conv2d`` whose weight is q(w, b, e) per output channel."""

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        bits: float,
        exponent: float | str,
        bits_max: float = BITS_MAX,
    ) -> SelfCompressingConv2d:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        copy_conv_attributes(module, new)
        new._init_self_compressing(bits, exponent, bits_max)
        return new.train(module.training)

    def to_float(self) -> nn.Conv2d:
        return plain_conv2d(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight_values(), self.bias)


class SelfCompressingLinear(_SelfCompressing, nn.Linear):
    """``nn.Linear`` whose weight is q(w, b, e) per output feature."""

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        bits: float,
        exponent: float | str,
        bits_max: float = BITS_MAX,
    ) -> SelfCompressingLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight, new.bias = module.weight, module.bias
        new._init_self_compressing(bits, exponent, bits_max)
        return new.train(module.training)

    def to_float(self) -> nn.Linear:
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight_values(), self.bias)


_LAYERS = {nn.Conv2d: SelfCompressingConv2d, nn.Linear: SelfCompressingLinear}


@dataclasses.dataclass(frozen=True)
class SelfCompressConfig(RecipeConfig):
    """Self-compression's parameters; ``gamma`` trades size for accuracy."""

    gamma: float = 0.04  # weight of the size loss Q (bits per original weight); docs/RESULTS.md
    bits_init: float = 4.0
    bits_max: float = BITS_MAX  # b is used, counted and kept (after each step) at most this
    exponent_init: float | Literal["auto"] = "auto"
    bits_lr: float = 50.0  # peak learning rate of b (its own group, no weight decay)
    exponent_lr: float | None = None  # of e (None: the run's lr; no weight decay)
    zero_shift_step: float = 1e-3  # soft-threshold per step on the shifts of dead channels
    remove: bool = True  # False: dead channels stay (zero) in place

    def validate(self) -> None:
        error = RecipeConfigError
        check_number("SelfCompressConfig.gamma", self.gamma, error, low=0.0, high=1e6)
        check_number("SelfCompressConfig.bits_max", self.bits_max, error, low=1.0, high=32.0)
        check_number(
            "SelfCompressConfig.bits_init", self.bits_init, error, low=0.0, high=self.bits_max
        )
        check_number("SelfCompressConfig.bits_lr", self.bits_lr, error, low=0.0, high=1e3)
        if self.exponent_lr is not None:
            check_number("SelfCompressConfig.exponent_lr", self.exponent_lr, error, low=0, high=1e3)
        check_number(
            "SelfCompressConfig.zero_shift_step", self.zero_shift_step, error, low=0.0, high=1e3
        )
        if self.exponent_init != "auto":
            check_number(
                "SelfCompressConfig.exponent_init", self.exponent_init, error, low=-64, high=64
            )


@register_recipe
class SelfCompress(Recipe):
    name = "selfcompress"
    paper = "Cséfalvay & Imber, Self-Compressing Neural Networks (arXiv 2301.13142, 2023)"
    description = "learned bits and exponent per channel, size loss, channels removed in training"
    config_class = SelfCompressConfig
    # The size loss reads b outside the forward pass and removals reshape parameters: whole
    # parameters on every rank (DDP, rebuilt after a removal), not FSDP2's shards.
    shardable = False

    def __init__(self, config: SelfCompressConfig | None = None) -> None:
        super().__init__(config)
        self.groups: list[ChannelGroup] = []
        self.removals: list[dict[str, Any]] = []  # replayed on resume and in load_run
        self.original_weights = 0
        self.removed_total = 0
        self.model: nn.Module | None = None  # the prepared model, for its size metrics

    # ---- set-up ----
    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        for name, module in list(model.named_modules()):
            layer = _LAYERS.get(type(module))
            if name and layer is not None and getattr(module, "groups", 1) == 1:
                parent, _, child = name.rpartition(".")
                new = layer.from_float(
                    module, config.bits_init, config.exponent_init, config.bits_max
                )
                setattr(model.get_submodule(parent) if parent else model, child, new)
        self.original_weights = sum(m.weight.numel() for m in _layers(model).values())
        self.groups = channel_groups(model)
        self.model = model
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """b in a group at ``bits_lr``, e at ``exponent_lr`` (None: the run's), both without
        weight decay; the rest as the run sets it."""
        layers = _layers(model).values()
        bits = [m.bits for m in layers]
        exponents = [m.exponent for m in layers]
        ids = {id(p) for p in (*bits, *exponents)}
        rest = [p for p in model.parameters() if id(p) not in ids]
        exponent_group: dict[str, Any] = {"params": exponents, "weight_decay": 0.0}
        if self.config.exponent_lr is not None:
            exponent_group["lr"] = self.config.exponent_lr
        return [
            {"params": rest},
            {"params": bits, "lr": self.config.bits_lr, "weight_decay": 0.0},
            exponent_group,
        ]

    # ---- the size loss ----
    def size_bits(self, model: nn.Module) -> torch.Tensor:
        """Σ z over the layers (differentiable in b), I counting the live input channels."""
        layers = _layers(model)
        dead_inputs = self._dead_inputs(model)
        total = torch.zeros(())
        for name, layer in layers.items():
            per_input = math.prod(layer.weight.shape[2:]) if layer.weight.dim() > 2 else 1
            alive = layer.weight.shape[1] - dead_inputs.get(name, 0)
            total = total + layer.used_bits().sum() * alive * per_input
        return total

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.gamma == 0:
            return None
        return self.config.gamma * self.size_bits(model) / self.original_weights

    # ---- dead channels: push their shifts to zero, then remove them ----
    def on_step_end(self, step: int, result: Any, model: nn.Module, optimizer: Any) -> bool:
        with torch.no_grad():  # b above the cap gets no gradient: keep it at the cap
            for layer in _layers(model).values():
                layer.bits.clamp_(max=layer.bits_max)
        changed = False
        for index, group in enumerate(self.groups):
            dead = self._dead(model, group)
            if dead is None or not bool(dead.any()):
                continue
            silent = self._silence(model, group, dead)
            removable = dead & silent
            if not self.config.remove or not bool(removable.any()):
                continue
            if bool(removable.all()):
                removable[torch.argmax(F.relu(self._group_bits(model, group)))] = False
                if not bool(removable.any()):
                    continue
            keep = torch.nonzero(~removable).flatten()
            self.groups[index] = remove_channels(model, optimizer, group, keep)
            self.removals.append({"producers": list(group.producers), "keep": keep.tolist()})
            self.removed_total += int(removable.sum())
            self.emit(
                "removed",
                producers=list(group.producers),
                channels=int(removable.sum()),
                left=len(keep),
            )
            changed = True
        return changed

    def _group_bits(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        """Per channel, the largest max(b, 0) over the group's producers."""
        layers = [model.get_submodule(p) for p in group.producers]
        return torch.stack([F.relu(layer.bits.detach()) for layer in layers]).amax(0)

    def _dead(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor | None:
        if not group.removable:
            return None
        return self._group_bits(model, group) == 0

    @torch.no_grad()
    def _silence(self, model: nn.Module, group: ChannelGroup, dead: torch.Tensor) -> torch.Tensor:
        """Zero the running mean of dead channels and soft-threshold their shifts toward
        zero; True where every shift of the channel is exactly zero."""
        step = self.config.zero_shift_step
        silent = torch.ones_like(dead)
        shifts = [model.get_submodule(n).bias for n in (*group.producers, *group.norms)]
        for name in group.norms:
            norm = model.get_submodule(name)
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean[dead] = 0.0
        for shift in shifts:
            if shift is None:
                continue
            values = shift.data[dead]
            shift.data[dead] = torch.sign(values) * F.relu(values.abs() - step)
            silent &= shift.data == 0
        return silent

    def _dead_inputs(self, model: nn.Module) -> dict[str, int]:
        """Per consumer, how many of its input channels are dead but not yet removed."""
        counts: dict[str, int] = {}
        for group in self.groups:
            dead = self._dead(model, group)
            if dead is None:
                continue
            for consumer in group.consumers:
                counts[consumer] = counts.get(consumer, 0) + int(dead.sum())
        return counts

    # ---- reporting and resume ----
    def metrics(self) -> dict[str, Any]:
        """The network's size now: bits per original weight (``bits_per_weight``, what Q
        counts, at ceil(b) bits), the fraction of weights left, channels removed so far, and
        each layer's output channels (``channels``)."""
        if self.model is None:
            return {}
        layers = _layers(self.model)
        weights = sum(m.weight.numel() for m in layers.values())
        bits = sum(m.weight_storage_bits() for m in layers.values())
        return {
            "bits_per_weight": bits / self.original_weights,
            "weights_left": weights / self.original_weights,
            "removed_channels": self.removed_total,
            "channels": {n: float(m.weight.shape[0]) for n, m in layers.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "removals": self.removals,
            "removed_total": self.removed_total,
            "original_weights": self.original_weights,
        }

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Replay the removals ``state`` holds beyond those this model already had (all of
        them on a freshly prepared model, before its weights load; none when the guard
        restores the state of the step it retries)."""
        removals = list(state.get("removals", []))
        done = len(self.removals)
        if removals[:done] != self.removals:
            raise RecipeConfigError(
                "selfcompress: the state to load has not had the removals this model has had; "
                "load it into a freshly prepared model"
            )
        for removal in removals[done:]:
            index = next(
                (i for i, g in enumerate(self.groups) if list(g.producers) == removal["producers"]),
                None,
            )
            if index is None:
                raise RecipeConfigError(
                    f"selfcompress: no channel group with producers {removal['producers']} "
                    "to replay a removal on: the model differs from the run's"
                )
            keep = torch.tensor(removal["keep"], dtype=torch.long)
            self.groups[index] = remove_channels(model, None, self.groups[index], keep)
        self.removals = removals
        self.removed_total = int(state.get("removed_total", 0))
        self.original_weights = int(state.get("original_weights", self.original_weights))


def _layers(model: nn.Module) -> dict[str, _SelfCompressing]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _SelfCompressing)}
