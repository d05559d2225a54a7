"""Unified INT8 — Zhu et al., "Towards Unified INT8 Training for Convolutional Neural
Network", CVPR 2020 (METHODS.md §4).

Every conv and linear layer computes its three products on symmetric int8 operands,
q = round(127·clamp(x, −c, c)/c): weights and activations per tensor at c = max|x| (nearest),
the layer gradient g_l per tensor with stochastic rounding — one quantized copy for both
backward products. Two techniques keep 8-bit gradients on course:

- Direction-sensitive gradient clipping: per layer, c = argmin over (0, max|g|] of the cosine
  distance d_c = 1 − ⟨g, ĝ⟩/(|g|·|ĝ|), found every ``interval`` iterations (the paper's
  periodic update, 100) and kept in between (``qtrain.observers.CosineClip``; the search is
  ``qtrain.clipping.cosine_optimal_clip``).
- Deviation-counteractive learning-rate scaling: each layer's weight takes lr·φ(d_c),
  φ = max(e^(−α·d_c), β) (α = 20, β = 0.1; ``qtrain.clipping.lr_scale``), through one
  optimizer group per layer, on top of the run's lr schedule — any torch optimizer.

The ablations: ``clipping=false`` clips at max|g| (plain absmax int8 gradients; with
``lr_scaling=false`` as well, no technique at all), ``lr_scaling=false`` keeps the clip alone.
Metrics: per layer d_c (every variant), c and φ(d_c) (where in use); clip state is in the model's
checkpointed buffers.

Example:
    >>> from torch import nn
    >>> model = UI8().prepare(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    >>> type(model[0].observers["grad_input"]).__name__
    'CosineClip'
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from typing import Any, Literal

from torch import nn

from qtrain.api import layer_observers, quantize_, quantized_modules
from qtrain.clipping import lr_scale
from qtrain.observers import CosineClip, GradientClip, observed_values
from qtrain.presets import symmetric_quantization
from qtrain.quantizer import Rounding
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.validation import check_int, check_number


@dataclasses.dataclass(frozen=True)
class UI8Config(RecipeConfig):
    """Unified INT8's parameters (the paper's defaults); the two booleans are its ablations."""

    bits: int = 8
    clipping: bool = True  # direction-sensitive gradient clipping; False: c = max|g|
    lr_scaling: bool = True  # deviation-counteractive lr scaling
    interval: int = 100  # iterations between clip searches (and d_c measurements)
    alpha: float = 20.0  # φ(d_c) = max(exp(−alpha·d_c), beta)
    beta: float = 0.1
    grad_rounding: Literal["stochastic", "nearest"] = "stochastic"

    def validate(self) -> None:
        error = RecipeConfigError
        check_int(f"{type(self).__name__}.bits", self.bits, error, low=2, high=16)
        check_int(f"{type(self).__name__}.interval", self.interval, error, low=1)
        check_number(f"{type(self).__name__}.alpha", self.alpha, error, low=0, high=1e6)
        if not 0 < self.beta <= 1:
            raise error(f"{type(self).__name__}.beta must be a number in (0, 1], got {self.beta!r}")


@register_recipe
class UI8(Recipe):
    name = "ui8"
    paper = "Zhu et al., Towards Unified INT8 Training for Convolutional Neural Network (CVPR 2020)"
    description = (
        "symmetric int8 W/A/G, SR gradients, cosine-optimal gradient clip per layer, "
        "per-layer lr x max(exp(-20 d_c), 0.1)"
    )
    config_class = UI8Config

    def __init__(self, config: UI8Config | None = None) -> None:
        super().__init__(config)
        self.observers: dict[str, GradientClip] = {}  # each layer's gradient observer

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        observer = CosineClip if config.clipping else GradientClip
        quantization = symmetric_quantization(
            config.bits,
            Rounding(config.grad_rounding),
            observers={"grad_input": functools.partial(observer, config.interval)},
        )
        model = quantize_(model, quantization)
        self.observers = layer_observers(model, "grad_input")
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """One group per quantized layer's weight (its lr is scaled by φ(d_c)), one for the
        rest. Biases stay in the rest: their gradient is the full-precision sum of g_l."""
        if not self.config.lr_scaling:
            return None
        modules = quantized_modules(model)
        layers = [(name, m.weight) for name, m in modules if name in self.observers]
        scaled = {id(weight) for _, weight in layers}
        rest = [p for p in model.parameters() if id(p) not in scaled]
        groups = [{"params": [weight], "layer": name} for name, weight in layers]
        return groups + ([{"params": rest}] if rest else [])

    def lr_scales(self) -> dict[str, float]:
        """φ(d_c) per layer from its last measured d_c."""
        config = self.config
        distances = observed_values(self.observers, lambda o: o.distance)
        return {name: lr_scale(min(d, 2.0), config.alpha, config.beta)
                for name, d in distances.items()}  # fmt: skip

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        if not self.config.lr_scaling:
            return
        scales = self.lr_scales()
        for group in optimizer.param_groups:  # lr already holds the run's schedule this step
            if group.get("layer") in scales:
                group["lr"] *= scales[group["layer"]]

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = gradient_metrics(self.observers)
        if self.config.clipping:
            out["clip"] = observed_values(self.observers, lambda o: o.clip)
        if self.config.lr_scaling:
            scales = self.lr_scales()
            out["lr_scale_mean"] = statistics.fmean(scales.values()) if scales else 1.0
            out["lr_scale"] = scales
        return out


def gradient_metrics(observers: dict[str, GradientClip], suffix: str = "") -> dict[str, Any]:
    """``d_c<suffix>``: each layer's last measured cosine distance between g and ĝ, and
    ``d_c<suffix>_mean`` over layers (left out before the first measurement)."""
    distances = observed_values(observers, lambda o: o.distance)
    if not distances:
        return {}
    return {f"d_c{suffix}_mean": statistics.fmean(distances.values()), f"d_c{suffix}": distances}
