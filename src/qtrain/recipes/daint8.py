"""Distribution-adaptive INT8 — Zhao et al., "Distribution Adaptive INT8 Quantization for
Training CNNs", AAAI 2021 (METHODS.md §5).

Unified INT8's symmetric quantizer, q = round(127·clamp(x, −c, c)/c): forward weights and
activations per tensor at c = max|x| (nearest); backward, the layer gradient g_l per tensor
for the grad-input product and per output channel ("vectorized") for the grad-weight product,
both with stochastic rounding. Each gradient channel (the grad-input copy: the whole tensor)
is classified every iteration (``qtrain.clipping.inverted_t_channels``):

- Gaussian, P(|g| > σ) > λ (λ = 0.3): clip at s = max|g|;
- inverted-T (sharp, long-tailed): magnitude-aware clipping, s_t = (1 − k·A)·s_{t−1} +
  A·max|g|_t with k = 1, A = 0.8 (``qtrain.clipping.magnitude_aware_clip``).

The recurrence state and the classification are per channel in each layer's observers
(``qtrain.observers.MagnitudeAwareClip``), checkpointed with the model. ``all_gaussian``
treats every channel as Gaussian (the ablation: per-channel absmax).

Metrics, per layer and as means over layers: the fraction of inverted-T grad-weight channels
(``inverted_t``: over channels and the iterations of the last ``interval``), and the cosine
distance d_c between g and ĝ of the grad-weight copy (``d_c``) and of the grad-input copy
(``d_c_grad_input``), measured every ``interval`` iterations.

Example:
    >>> from torch import nn
    >>> model = DAInt8().prepare(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    >>> model[0].config.grad_weight_spec.granularity
    PerChannel(axis=1)
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from typing import Any, Literal

from torch import nn

from qtrain.api import layer_observers, quantize_
from qtrain.clipping import check_recurrence
from qtrain.observers import MagnitudeAwareClip, observed_values
from qtrain.presets import symmetric_quantization
from qtrain.quantizer import PerChannel, Rounding
from qtrain.recipes.base import Recipe, RecipeConfig, RecipeConfigError, register_recipe
from qtrain.recipes.ui8 import gradient_metrics
from qtrain.validation import check_int


@dataclasses.dataclass(frozen=True)
class DAInt8Config(RecipeConfig):
    """Distribution-adaptive INT8's parameters (the paper's defaults)."""

    bits: int = 8
    threshold: float = 0.3  # λ: Gaussian if P(|g| > σ) > λ
    k: float = 1.0  # s_t = (1 − k·A)·s_{t−1} + A·max|g|_t
    a: float = 0.8
    all_gaussian: bool = False  # the ablation: every channel clips at its max|g|
    grad_rounding: Literal["stochastic", "nearest"] = "stochastic"
    interval: int = 100  # iterations between d_c measurements and inverted-T readings

    def validate(self) -> None:
        error = RecipeConfigError
        check_int("DAInt8Config.bits", self.bits, error, low=2, high=16)
        check_int("DAInt8Config.interval", self.interval, error, low=1)
        if not 0 < self.threshold < 1:
            raise error(f"DAInt8Config.threshold must be in (0, 1), got {self.threshold!r}")
        check_recurrence("DAInt8Config", self.k, self.a, error)


@register_recipe
class DAInt8(Recipe):
    name = "daint8"
    paper = "Zhao et al., Distribution Adaptive INT8 Quantization for Training CNNs (AAAI 2021)"
    description = (
        "symmetric int8 W/A/G, per-channel grad-weight; Gaussian channels clip at max|g|, "
        "inverted-T ones by the magnitude-aware recurrence"
    )
    config_class = DAInt8Config

    def __init__(self, config: DAInt8Config | None = None) -> None:
        super().__init__(config)
        self.observers: dict[str, dict[str, MagnitudeAwareClip]] = {}  # by role, then layer

    def prepare(self, model: nn.Module) -> nn.Module:
        config = self.config
        observer = functools.partial(
            MagnitudeAwareClip, config.threshold, config.k, config.a, config.all_gaussian,
            config.interval,
        )  # fmt: skip
        quantization = symmetric_quantization(
            config.bits,
            Rounding(config.grad_rounding),
            grad_weight_granularity=PerChannel(1),  # g_l's output channels: (N, C_out, ...)
            observers={"grad_input": observer, "grad_weight": observer},
        )
        model = quantize_(model, quantization)
        roles = ("grad_input", "grad_weight")
        self.observers = {role: layer_observers(model, role) for role in roles}
        return model

    def metrics(self) -> dict[str, Any]:
        grad_weight = self.observers.get("grad_weight", {})
        out = {
            **gradient_metrics(grad_weight),
            **gradient_metrics(self.observers.get("grad_input", {}), "_grad_input"),
        }
        inverted = observed_values(grad_weight, lambda o: o.inverted_rate)
        if inverted:
            out["inverted_t_mean"] = statistics.fmean(inverted.values())
            out["inverted_t"] = inverted
        return out
